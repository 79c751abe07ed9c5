"""Test-only fault injection at named points of multi-step operations.

``FAULT_POINTS=provision.after_commit:1,migration.settings`` makes the named points
raise :class:`InjectedFaultError` (the first once, the second every time). Empty in every
real deployment; the tests use it to prove that a failure half-way leaves no half state.
"""

from __future__ import annotations

import logging

log = logging.getLogger("towerco.faults")


class InjectedFaultError(RuntimeError):
    """A failure injected on purpose at a named point."""


class Faults:
    def __init__(self, spec: str) -> None:
        self._remaining: dict[str, int | None] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            point, _, times = item.partition(":")
            self._remaining[point] = int(times) if times else None
        if self._remaining:
            log.warning("fault injection enabled at %s", ", ".join(sorted(self._remaining)))

    def check(self, point: str) -> None:
        """Raise at ``point`` if a fault is armed there."""
        if point not in self._remaining:
            return
        left = self._remaining[point]
        if left is not None:
            if left <= 0:
                return
            self._remaining[point] = left - 1
        raise InjectedFaultError(f"fault injected at {point}")
