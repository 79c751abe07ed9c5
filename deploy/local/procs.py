"""Process, pid-file, lock and Unix-user helpers shared by the local server launchers."""

from __future__ import annotations

import fcntl
import os
import pwd
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services.runtime.environment import process_environment


class LocalServerError(RuntimeError):
    """A local server could not be started, checked or stopped."""


@dataclass(frozen=True)
class SystemUser:
    """An unprivileged Unix account that a server process runs as."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class CommandResult:
    """Exit status and combined output of a finished command."""

    returncode: int
    output: str


def clean_env() -> dict[str, str]:
    """The current environment without ``PG*`` variables, which would redirect the PostgreSQL tools."""
    return {key: value for key, value in process_environment().items() if not key.startswith("PG")}


def run_command(
    argv: Sequence[str],
    *,
    user: SystemUser | None = None,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
) -> CommandResult:
    """Run ``argv`` to completion (as ``user`` if given) and return its status and output.

    Output goes to a temporary file rather than a pipe: a daemon the command leaves behind
    (``pg_ctl start``, ``redis-server --daemonize``) may inherit the pipe and hold it open.
    """
    with tempfile.TemporaryFile("w+") as out:
        try:
            completed = subprocess.run(  # noqa: S603 - argv is built here, never by a shell
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
                env=clean_env() if env is None else env,
                timeout=timeout,
                check=False,
                text=True,
                user=None if user is None else user.uid,
                group=None if user is None else user.gid,
                extra_groups=None if user is None else [],
            )
        except subprocess.TimeoutExpired as exc:
            out.seek(0)
            raise LocalServerError(f"{argv[0]} timed out after {timeout:g}s:\n{out.read()}") from exc
        out.seek(0)
        return CommandResult(completed.returncode, out.read())


def pid_exists(pid: int) -> bool:
    """Whether ``kill(pid, 0)`` finds a process, counting zombies that nobody has reaped yet."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` names a live process (a zombie that nobody reaped counts as dead).

    A daemon's parent is init, and in containers init may reap late or never.
    """
    if not pid_exists(pid):
        return False
    if _task_state(Path(f"/proc/{pid}/stat")) not in ("Z", "X"):
        return True
    # A killed multi-threaded process (redis-server) shows its main thread as a zombie while
    # the other threads still exit and still hold its sockets and files.
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    return any(_task_state(task / "stat") not in ("Z", "X", "") for task in tasks)


def _task_state(stat_file: Path) -> str:
    """The state letter in a ``/proc`` stat file ("" if unreadable, "?" if unknown)."""
    try:
        stat_line = stat_file.read_text()
    except OSError:
        return ""
    # The state letter follows the parenthesised command name, which may itself hold ")".
    fields = stat_line.rpartition(")")[2].split()
    return fields[0] if fields else "?"


def works_in(pid: int, directory: Path) -> bool | None:
    """Whether ``pid``'s working directory is ``directory``; None if that cannot be read.

    Both servers ``chdir`` into their data directory, so this tells a live server of ours
    from an unrelated process that inherited the pid of a crashed one.
    """
    try:
        cwd = os.stat(f"/proc/{pid}/cwd")
        here = directory.stat()
    except PermissionError:
        return None
    except OSError:
        return False
    return (cwd.st_dev, cwd.st_ino) == (here.st_dev, here.st_ino)


def read_pid_file(path: Path) -> int | None:
    """The pid on the first line of ``path``, or None if it is missing or malformed."""
    try:
        first = path.read_text().splitlines()[0:1]
    except OSError:
        return None
    try:
        return int(first[0].strip()) if first else None
    except ValueError:
        return None


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block's duration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_system_user(name: str) -> SystemUser:
    """Look up the Unix account ``name``, creating it as a locked system account if missing."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        created = run_command(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            timeout=30.0,
        )
        try:
            entry = pwd.getpwnam(name)  # a concurrent caller may have won the race
        except KeyError:
            raise LocalServerError(f"could not create system user {name!r}:\n{created.output}") from None
    return SystemUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def ensure_traversable(path: Path) -> None:
    """Add search permission for others on every ancestor directory of ``path``."""
    for ancestor in path.absolute().parents:
        mode = ancestor.stat().st_mode
        if mode & stat.S_IXOTH == 0:
            ancestor.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def give_to(path: Path, user: SystemUser | None) -> None:
    """Make ``user`` the owner of ``path`` (no-op when ``user`` is None)."""
    if user is not None:
        os.chown(path, user.uid, user.gid)


def give_tree_to(root: Path, user: SystemUser) -> None:
    """Make ``user`` the owner of ``root`` and everything below it (symlinks themselves, not targets)."""
    os.chown(root, user.uid, user.gid)
    for directory, subdirs, files in os.walk(root):
        for name in [*subdirs, *files]:
            os.chown(os.path.join(directory, name), user.uid, user.gid, follow_symlinks=False)
