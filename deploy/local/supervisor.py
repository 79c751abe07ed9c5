"""Keeps the ``make run`` stack up: whatever crashes is restarted, with a backoff, and said so.

PostgreSQL, Redis, each service and the Envoy gateway are watched a few times a second.
One that is gone is started again after a delay that doubles with each crash; the stack
stops only when asked to (Ctrl-C), or when one of them keeps crashing (``max_crashes``
within ``window`` seconds), and then says why.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartPolicy:
    """How soon a crashed process is restarted, and how many crashes end the stack."""

    #: Delay before the first restart; doubled for each further crash within ``window``.
    first_delay: float = 0.5
    max_delay: float = 8.0
    #: This many crashes of one process within ``window`` seconds stop the stack.
    max_crashes: int = 5
    window: float = 60.0

    def delay(self, crashes: int) -> float:
        return float(min(self.max_delay, self.first_delay * 2 ** max(0, crashes - 1)))


@dataclass
class Supervised:
    """One process the stack keeps running."""

    name: str
    #: None while it runs; otherwise what became of it ("exited with code -9").
    check: Callable[[], str | None]
    #: Starts it again and returns what to say about the new one ("pid 4242").
    restart: Callable[[], str]
    #: Names of the processes it cannot start without (a service's PostgreSQL): while one
    #: of them is down, its restart waits instead of failing and counting as a crash.
    needs: tuple[str, ...] = ()
    crashes: deque[float] = field(default_factory=deque)
    restart_at: float | None = None


def say(line: str) -> None:
    print(f"make run: {line}", file=sys.stderr, flush=True)


class Supervisor:
    """Watches ``processes`` in order (servers before the services that use them)."""

    def __init__(
        self,
        processes: Sequence[Supervised],
        policy: RestartPolicy | None = None,
        *,
        report: Callable[[str], None] = say,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.processes = list(processes)
        self.policy = policy or RestartPolicy()
        self._report = report
        self._clock = clock

    def watch(self, stopping: Callable[[], bool], interval: float = 0.2) -> str | None:
        """Until ``stopping()``: then None. Returns early with the reason if one process keeps crashing."""
        while not stopping():
            reason = self.tick(stopping)
            if reason is not None:
                return reason
            time.sleep(interval)
        return None

    def tick(self, stopping: Callable[[], bool] = lambda: False) -> str | None:
        """Check each process once; restart those whose delay is over. The reason to give up, if any."""
        for process in self.processes:
            if stopping():  # Ctrl-C reaches the services too: their exit then is no crash
                return None
            if process.restart_at is None:
                problem = process.check()
                reason = self._crashed(process, problem) if problem is not None else None
            elif self._clock() >= process.restart_at and not self._waiting(process):
                reason = self._restart(process)
            else:
                reason = None
            if reason is not None:
                return reason
        return None

    def _waiting(self, process: Supervised) -> bool:
        return any(other.restart_at is not None for other in self.processes if other.name in process.needs)

    def _restart(self, process: Supervised) -> str | None:
        try:
            what = process.restart()
        except (OSError, RuntimeError) as exc:  # LocalServerError is a RuntimeError
            return self._crashed(process, f"could not be restarted: {_first_line(exc)}")
        process.restart_at = None
        self._report(f"{process.name} restarted ({what})")
        return None

    def _crashed(self, process: Supervised, problem: str) -> str | None:
        now = self._clock()
        policy = self.policy
        process.crashes.append(now)
        while now - process.crashes[0] > policy.window:
            process.crashes.popleft()
        count = len(process.crashes)
        if count >= policy.max_crashes:
            return f"{process.name} {problem}: {count} crashes within {policy.window:g}s, giving up"
        delay = policy.delay(count)
        process.restart_at = now + delay
        self._report(f"{process.name} {problem}; restarting it in {delay:g}s (crash {count} within {policy.window:g}s)")
        return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
