"""A command run as from a terminal: its output read as it comes, Ctrl-C sent to its process group."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path


class Console:
    """``argv`` in its own process group (a terminal's job), stdout and stderr merged into ``text``.

    A thread reads the output all the time, so a chatty process never blocks on a full pipe.
    """

    def __init__(self, argv: Sequence[str], cwd: Path, env: dict[str, str]) -> None:
        self._text = ""
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # A terminal's job takes Ctrl-C; a suite started in the background (``make test &``,
            # nohup) ignores SIGINT, and the ignoring would be inherited down to ``make run``.
            preexec_fn=_default_sigint,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def text(self) -> str:
        with self._changed:
            return self._text

    def _read(self) -> None:
        assert self.process.stdout is not None
        for chunk in iter(lambda: os.read(self.process.stdout.fileno(), 65536), b""):  # type: ignore[union-attr]
            with self._changed:
                self._text += chunk.decode(errors="replace")
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def mark(self) -> int:
        """Where the output so far ends: ``wait_for(..., since=mark)`` looks only at what comes after."""
        return len(self.text)

    def wait_for(self, text: str, timeout: float, since: int = 0) -> None:
        """Until ``text`` appears after ``since``; fails with the output if it does not in time or the command ends."""
        with self._changed:
            found = self._changed.wait_for(
                lambda: text in self._text[since:] or not self._reader.is_alive(), timeout=timeout
            )
            if not found or text not in self._text[since:]:
                raise AssertionError(f"{text!r} did not appear; the output was:\n{self._text[-4000:]}")

    def interrupt(self, timeout: float = 60) -> str:
        """Ctrl-C, as a terminal sends it: SIGINT to the whole process group; returns all the output."""
        try:
            os.killpg(self.process.pid, signal.SIGINT)
            self.process.wait(timeout)
        except ProcessLookupError:
            pass  # the whole group is gone already
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._reader.join(timeout)
        return self.text


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
