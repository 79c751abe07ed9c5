"""The retention job: each tenant's audit events older than its plan's period are purged.

Runs in the audit service every ``AUDIT_RETENTION_INTERVAL_SECONDS`` (and once per run of
``python -m services.audit retention``, the cluster's CronJob). A tenant's period is its
``audit_retention_days`` limit (its plan's, or an override set through the feature gate);
-1 keeps everything ("keep forever", by plan or override). A tenant under legal hold
(the registry's SetLegalHold, a flag of the tenant state every service caches) keeps
everything whatever its period, and is purged again by the first round after the hold is lifted.

It deletes as ``audit_retention`` (services/audit/retention.py), from a DSN of its own
(``AUDIT_RETENTION_DATABASE_URL``): the runtime role ``audit_app`` may never delete an
event. It keeps what ``audit.purge_events`` keeps, an unbroken tail of each chain and the
newest event, but deletes the oldest first, ``batch`` rows per short transaction, so the
chain verifies after every batch and no call waits on the purge for more than one batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import grpc

from services.runtime import context, metrics
from services.runtime.db import UNREACHABLE
from services.runtime.entitlements import Entitlements
from services.runtime.plans import UNLIMITED
from services.runtime.tenants import TenantInfo

from .retention import RETENTION_ROLE

log = logging.getLogger("towerco.audit.retention")

TABLE = "audit.events"
LIMIT = "audit_retention_days"

_AS_RETENTION = f"SET LOCAL ROLE {RETENTION_ROLE}"
_TENANTS_SQL = "SELECT DISTINCT tenant_id FROM audit.events"
# What audit.purge_events keeps: everything from the first event inside the period, and
# at least the newest one.
_KEEP_FROM_SQL = """
SELECT coalesce(min(sequence) FILTER (WHERE create_time >= now() - make_interval(days => $2)), max(sequence))
FROM audit.events WHERE tenant_id = $1
"""
_DELETE_SQL = """
DELETE FROM audit.events WHERE tenant_id = $1 AND sequence IN (
    SELECT sequence FROM audit.events WHERE tenant_id = $1 AND sequence < $2 ORDER BY sequence LIMIT $3
)
"""
_FAILURES = (asyncpg.PostgresError, OSError, asyncio.TimeoutError)

#: A tenant's entitlements now (None: a tenant the platform does not know).
Lookup = Callable[[str], Awaitable[Entitlements | None]]
#: Whether a tenant is under legal hold now (True also when the registry cannot say).
Held = Callable[[str], Awaitable[bool]]


def held_in(lookup: Callable[[str], Awaitable[TenantInfo | None]]) -> Held:
    """A tenant's legal hold from its cached state; when the registry cannot answer, held (kept)."""

    async def held(tenant_id: str) -> bool:
        try:
            info = await lookup(tenant_id)
        except grpc.aio.AioRpcError as exc:
            log.warning("audit retention: tenant %s kept this round, its legal hold is unknown: %s", tenant_id, exc)
            return True
        return info is not None and info.legal_hold

    return held


class RetentionJob:
    """Purges every tenant's expired audit events, every ``interval`` seconds once started."""

    def __init__(
        self, dsn: str, entitlements: Lookup, held: Held, interval: float, batch: int, cell_dsns: Sequence[str] = ()
    ) -> None:
        self._dsn = dsn
        #: The other database cells': their tenants' events are purged in the same round.
        self._cell_dsns = tuple(cell_dsns)
        self._entitlements = entitlements
        self._held = held
        self._interval = interval
        self._batch = batch
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-retention")

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def run_once(self) -> dict[str, int]:
        """One round in each cell: the events removed per tenant (tenants that lost none are left out).

        A cell other than the home one that cannot be reached is left for the next round.
        """
        removed = await self._run_in(self._dsn)
        for dsn in self._cell_dsns:
            try:
                removed.update(await self._run_in(dsn))
            except UNREACHABLE as exc:
                log.warning("audit retention: a cell is unreachable (%s); its tenants wait for the next round", exc)
        return removed

    async def _run_in(self, dsn: str) -> dict[str, int]:
        """One round in the database of ``dsn``."""
        # No statement cache and every statement in a transaction that sets the role locally:
        # the DSN may lead through pgbouncer in transaction mode (DB_POOL_MODE), where neither
        # a session's SET nor its prepared statements outlive a transaction.
        conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn, statement_cache_size=0)
        try:
            async with conn.transaction(readonly=True):
                await conn.execute(_AS_RETENTION)
                tenants = [r["tenant_id"] for r in await conn.fetch(_TENANTS_SQL)]
            removed: dict[str, int] = {}
            for tenant_id in tenants:
                if self._stop.is_set():
                    break
                days = await self._period(tenant_id)
                if days is None:
                    log.debug("audit events: tenant %s is kept (held, unknown, or kept forever)", tenant_id)
                    continue
                count = await self._purge_tenant(conn, tenant_id, days)
                if count:
                    removed[tenant_id] = count
                    log.info("audit events: removed %d older than %d days for tenant %s", count, days, tenant_id)
                    metrics.active().retention_purged(TABLE, count)
            return removed
        finally:
            await conn.close()

    async def _period(self, tenant_id: str) -> int | None:
        """The tenant's period in days; None: keep its events (held, unknown, or a canary)."""
        if tenant_id in context.CANARY_TENANTS or tenant_id == context.PLATFORM_TENANT:
            return None
        if await self._held(tenant_id):
            return None
        found = await self._entitlements(tenant_id)
        if found is None:
            return None  # a tenant the platform no longer knows: its offboarding decides
        days = found.limit(LIMIT)
        return None if days == UNLIMITED else days

    async def _purge_tenant(self, conn: asyncpg.Connection[Any], tenant_id: str, days: int) -> int:
        async with conn.transaction(readonly=True):
            await conn.execute(_AS_RETENTION)
            keep_from = await conn.fetchval(_KEEP_FROM_SQL, tenant_id, days)
        total = 0
        while keep_from is not None and not self._stop.is_set():
            async with conn.transaction():
                await conn.execute(_AS_RETENTION)
                status = await conn.execute(_DELETE_SQL, tenant_id, keep_from, self._batch)
            deleted = int(status.split()[-1])
            total += deleted
            if deleted < self._batch:
                break
        return total

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.run_once()
            except _FAILURES as exc:  # the next round tries again
                log.error("audit retention: purge failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._interval)
