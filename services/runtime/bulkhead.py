"""Per-tenant bulkheads over a process's one connection pool.

The pool is shared by every tenant a process serves; without a bulkhead one tenant's
burst of slow calls could hold every connection and stall everyone else. Each tenant may
hold at most its plan's ``db_concurrency`` connections at once (enterprise 20,
professional 10, basic 5), and never the whole pool: at least one connection is always
left for the other tenants. A transaction over the limit waits briefly for a slot, then
fails with RESOURCE_EXHAUSTED, reason TENANT_CONCURRENCY_LIMIT.

The interceptor chain puts the calling tenant's limit in a context variable
(:func:`limited`); :class:`~services.runtime.db.Database` takes a slot for every tenant
transaction of that call. Work without a limit (platform and background paths) takes none.
"""

from __future__ import annotations

import asyncio
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass, field

from . import metrics
from .context import Bound
from .errors import ErrorReason, resource_exhausted

_limit: ContextVar[int | None] = ContextVar("towerco_tenant_db_concurrency", default=None)


def limited(limit: int) -> Bound[int]:
    """Within the block, the current tenant may hold at most ``limit`` connections (-1: no plan cap)."""
    return Bound(_limit, limit)


def current_limit() -> int | None:
    return _limit.get()


@dataclass
class _Slots:
    in_use: int = 0
    waiters: int = 0
    queue: deque[asyncio.Future[None]] = field(default_factory=deque)

    def wake_one(self) -> None:
        while self.queue:
            waiter = self.queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class Bulkhead:
    """Counts each tenant's connections in use. Single event loop: no await between a
    check and its update, so no lock is needed."""

    def __init__(self, pool_size: int, wait_seconds: float) -> None:
        #: The most any one tenant may hold: the pool but one (all of a pool of one).
        self.ceiling = max(1, pool_size - 1)
        self._wait = wait_seconds
        self._tenants: dict[str, _Slots] = {}

    def capacity(self, limit: int) -> int:
        return self.ceiling if limit < 0 else min(limit, self.ceiling)

    def in_use(self, tenant_id: str) -> int:
        slots = self._tenants.get(tenant_id)
        return slots.in_use if slots else 0

    def slot(self, tenant_id: str, limit: int) -> Slot:
        """``async with bulkhead.slot(tenant_id, limit):`` one of the tenant's connections for the block."""
        return Slot(self, tenant_id, limit)

    async def _take(self, tenant_id: str, limit: int) -> _Slots:
        capacity = self.capacity(limit)
        slots = self._tenants.get(tenant_id)
        if slots is None:
            slots = self._tenants[tenant_id] = _Slots()
        if slots.in_use >= capacity:
            await self._wait_for_slot(tenant_id, slots, capacity)
        slots.in_use += 1
        return slots

    def _give_back(self, tenant_id: str, slots: _Slots) -> None:
        slots.in_use -= 1
        slots.wake_one()
        if slots.in_use == 0 and slots.waiters == 0 and self._tenants.get(tenant_id) is slots:
            del self._tenants[tenant_id]

    async def _wait_for_slot(self, tenant_id: str, slots: _Slots, capacity: int) -> None:
        loop = asyncio.get_running_loop()
        metrics.active().bulkhead_wait()
        slots.waiters += 1
        try:
            async with asyncio.timeout(self._wait):
                while slots.in_use >= capacity:
                    waiter: asyncio.Future[None] = loop.create_future()
                    slots.queue.append(waiter)
                    await waiter
        except TimeoutError:
            slots.wake_one()  # a slot freed while this one gave up goes to the next waiter
            metrics.active().bulkhead_refusal()
            raise resource_exhausted(
                f"tenant {tenant_id!r} already uses all {capacity} of its database connections "
                "in this service; retry shortly",
                ErrorReason.TENANT_CONCURRENCY_LIMIT,
                retry_after_seconds=max(self._wait, 0.1),
                limit=str(capacity),
            ) from None
        finally:
            slots.waiters -= 1


class Slot:
    """A tenant's slot for one block (:meth:`Bulkhead.slot`). A class, not an async generator:
    every tenant transaction of a call with a limit enters one."""

    __slots__ = ("_bulkhead", "_limit", "_slots", "_tenant_id")

    def __init__(self, bulkhead: Bulkhead, tenant_id: str, limit: int) -> None:
        self._bulkhead = bulkhead
        self._tenant_id = tenant_id
        self._limit = limit

    async def __aenter__(self) -> None:
        self._slots = await self._bulkhead._take(self._tenant_id, self._limit)

    async def __aexit__(self, *exc_info: object) -> None:
        self._bulkhead._give_back(self._tenant_id, self._slots)
