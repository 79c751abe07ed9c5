"""Idempotency records expire: a background task deletes those older than the window.

A ``request_id`` is honoured for ``IDEMPOTENCY_WINDOW_SECONDS``; the replay look-up
already ignores an older record (so the window is exact whenever the purge runs), and this
task removes such records so that the table's size is bounded by the window's traffic.

Each round finds the tenants holding expired records in one READ ONLY platform read
(tenant ids only; the table's ``platform_read`` policy), then, bound to each tenant in
turn (``context.system_scope``), deletes its expired records ``batch`` rows per short
transaction, so no call waits on more than one batch: the only call that touches an
expired record is a CreateSite reusing its ``request_id``. (No SKIP LOCKED: ``FOR UPDATE``
would need the UPDATE privilege, which the runtime role does not have on the table.)
One INFO line per tenant that lost records, and ``towerco_retention_purged_rows_total
{service,table}`` counts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import asyncpg

from . import context, metrics
from .db import UNREACHABLE, Database

log = logging.getLogger("towerco.idempotency")

#: Rows deleted per transaction: small, so a row lock is held for one short statement.
BATCH_ROWS = 500


@dataclass(frozen=True)
class Records:
    """Where a service keeps idempotency records, and how its expired ones go."""

    #: Schema-qualified, from the service's code (never from a caller); the metric's ``table`` label.
    table: str
    #: The tenants holding expired records (``$1``: the window in seconds); run in a platform read.
    tenants_sql: str
    #: Removes up to ``$3`` of tenant ``$1``'s records older than ``$2`` seconds; its status ends in the count.
    purge_sql: str
    #: What the rows are, in the log line; and the purpose the tenant is bound for (``system_scope``).
    what: str = "idempotency records"
    purpose: str = "idempotency.purge"


def request_table(table: str) -> Records:
    """Records kept in a table of their own (``tenant_id``, ``create_time``): expired rows are deleted."""
    return aged_rows(table, "create_time")


def aged_rows(
    table: str, time_column: str, what: str = "idempotency records", purpose: str = "idempotency.purge"
) -> Records:
    """Rows of a per-tenant table (``tenant_id``) deleted once ``time_column`` is older than the period.

    The same purge serves any retention period given in seconds (usage records: days x 86400).
    """
    return Records(
        table=table,
        tenants_sql=f"SELECT DISTINCT tenant_id FROM {table} WHERE {time_column} < now() - make_interval(secs => $1)",
        purge_sql=f"""
DELETE FROM {table} WHERE ctid IN (
    SELECT ctid FROM {table}
    WHERE tenant_id = $1 AND {time_column} < now() - make_interval(secs => $2)
    LIMIT $3
)
""",
        what=what,
        purpose=purpose,
    )


_FAILURES: tuple[type[BaseException], ...] = (*UNREACHABLE, asyncpg.PostgresError, OSError)


class IdempotencyPurge:
    """Removes ``records`` older than ``window`` seconds, every ``interval`` seconds.

    Named for its first use; any per-tenant retention period runs on it (``aged_rows``).
    """

    def __init__(self, db: Database, records: Records, window: float, interval: float, batch: int = BATCH_ROWS) -> None:
        self._db = db
        self._records = records
        self._table = records.table
        self._window = window
        self._interval = interval
        self._batch = batch
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"idempotency-purge-{self._table}")

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def purge(self) -> dict[str, int]:
        """One round in each database cell: the rows removed per tenant (tenants that lost none are left out).

        A cell other than the home one that cannot be reached is left for the next round.
        """
        removed: dict[str, int] = {}
        for in_cell in await self._db.in_each_cell(self._purge_cell):
            removed.update(in_cell)
        return removed

    async def _purge_cell(self, cell: str) -> dict[str, int]:
        async with self._db.platform_read(f"{self._records.purpose}: tenants with expired records") as conn:
            rows = await conn.fetch(self._records.tenants_sql, self._window)
        removed: dict[str, int] = {}
        for row in rows:
            tenant_id = row["tenant_id"]
            if tenant_id in context.CANARY_TENANTS:  # the isolation canary's sentinels stay
                continue
            count = await self._purge_tenant(tenant_id)
            if count:
                removed[tenant_id] = count
                log.info("%s: removed %d from %s for tenant %s", self._records.what, count, self._table, tenant_id)
                metrics.active().retention_purged(self._table, count)
        return removed

    async def _purge_tenant(self, tenant_id: str) -> int:
        total = 0
        statement = self._records.purge_sql
        with context.system_scope(tenant_id, self._records.purpose):
            while not self._stop.is_set():
                async with self._db.transaction() as conn:
                    status = await conn.execute(statement, tenant_id, self._window, self._batch)
                deleted = int(status.split()[-1])
                total += deleted
                if deleted < self._batch:
                    break
        return total

    async def _run(self) -> None:
        # The first round one interval after the start: replicas restarted together do not purge at once.
        while not await self._wait():
            try:
                await self.purge()
            except _FAILURES as exc:  # the next round tries again; an outage is logged as one elsewhere
                if not isinstance(exc, UNREACHABLE):
                    log.error("%s of %s: purge failed: %s", self._records.what, self._table, exc)

    async def _wait(self) -> bool:
        """Waits one interval; whether the task is stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), self._interval)
        return self._stop.is_set()
