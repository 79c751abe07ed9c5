"""Background work a service runs on its own account, one task per key at a time."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any


class KeyedTasks:
    """At most one running task per key (a tenant, a migration); all cancelled at shutdown."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._running: dict[str, asyncio.Task[None]] = {}

    def start(self, key: str, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` unless a task for ``key`` is still running (then ``work`` is dropped)."""
        current = self._running.get(key)
        if current is not None and not current.done():
            work.close()
            return
        self._running[key] = asyncio.create_task(work, name=f"{self._prefix}-{key}")

    async def close(self) -> None:
        for task in self._running.values():
            task.cancel()
        for task in self._running.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
