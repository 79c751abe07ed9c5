"""The isolation guard of the cells that were down when a process started, run once each answers.

A process starts without waiting for its other cells (their tenants' calls are UNAVAILABLE
meanwhile), but it never serves a cell its guard has not passed: :class:`LateCellGuard` asks
each such cell every ``interval`` seconds and lets the pool serve it once the guard passes.
A cell whose guard finds a breach stays refused, logged as critical.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping

from .db import UNREACHABLE, Database
from .guard import IsolationError

log = logging.getLogger("towerco.guard")

#: Runs the isolation guard on a cell's DSN: IsolationError on a breach, UNREACHABLE while it is down.
Check = Callable[[str], Awaitable[None]]


class LateCellGuard:
    """Guards the cells in ``pending`` (name -> DSN) once they answer; the database serves each only then."""

    def __init__(self, db: Database, check: Check, pending: Mapping[str, str], interval: float = 1.0) -> None:
        self._db = db
        self._check = check
        self._pending = dict(pending)
        self._interval = interval
        self._breached: set[str] = set()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        db.hold_until_guarded(self._pending)

    async def start(self) -> None:
        if self._pending:
            self._task = asyncio.create_task(self._run(), name="late-cell-guard")

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while self._pending and not self._stop.is_set():
            for cell, dsn in list(self._pending.items()):
                try:
                    await self._check(dsn)
                except UNREACHABLE:
                    continue
                except IsolationError as exc:
                    if cell not in self._breached:
                        self._breached.add(cell)
                        log.critical("cell %s: the isolation guard failed, its tenants stay refused: %s", cell, exc)
                    continue
                del self._pending[cell]
                self._db.guarded(cell)
                log.info("cell %s answers and passed the isolation guard: its tenants are served", cell)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._interval)
