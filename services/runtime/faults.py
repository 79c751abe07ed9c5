"""Test-only fault injection at named points of multi-step operations.

``FAULT_POINTS=provision.after_commit:1,migration.settings`` makes the named points
raise :class:`InjectedFaultError` (the first once, the second every time), and
``sites.analytics@2.5`` makes a point that :meth:`Faults.pause` guards wait 2.5 seconds
(a slow call). Empty in every real deployment; the tests use it to prove that a failure
half-way leaves no half state, and that slow calls of one tenant do not stall others.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("towerco.faults")


class InjectedFaultError(RuntimeError):
    """A failure injected on purpose at a named point."""


class Faults:
    def __init__(self, spec: str) -> None:
        self._remaining: dict[str, int | None] = {}
        self._delays: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            if "@" in item:
                point, _, seconds = item.partition("@")
                self._delays[point] = float(seconds)
                continue
            point, _, times = item.partition(":")
            self._remaining[point] = int(times) if times else None
        if self._remaining or self._delays:
            log.warning("fault injection enabled at %s", ", ".join(sorted({*self._remaining, *self._delays})))

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

    async def pause(self, point: str) -> None:
        """Wait at ``point`` if a delay is armed there."""
        delay = self._delays.get(point)
        if delay:
            await asyncio.sleep(delay)
