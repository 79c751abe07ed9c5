"""Leak detection: two reserved canary tenants, and a periodic check that neither sees the other.

Every service holds a sentinel row of each canary tenant (:data:`CANARY_TENANTS`) in each of
its tenant tables, seeded idempotently at start-up through ``context.system_scope``. Every
``CANARY_INTERVAL_SECONDS`` the service opens a real tenant transaction as each canary in
turn (``Database.transaction()``: ``set_config('app.current_tenant_id', ..., true)``, RLS,
the runtime role) and looks, in every table of its schema with a ``tenant_id`` column (read
from the catalog, so a new table is checked without anyone listing it), for:

- the other canary's rows, asked for by tenant as the services' queries ask (``WHERE
  tenant_id = $1``), the way a query handed the wrong tenant would find them; and
- any row that is not its own, with no condition on the bound tenant at all, so that
  row-level security alone stands between the canary and every other tenant.

Any row found is a breach: ``towerco_isolation_breach_total{service}`` goes up (the
``TenantIsolationBreach`` alert fires on it), a CRITICAL line names the table, and the
health check answers NOT_SERVING for the service's gRPC service names until a round finds
nothing again (``services/runtime/health.py``, with the database's reachability). Those
names are the service's readiness, which the gateway and the cluster ask: a broken policy
is in the shared database, so every replica of the service leaves at once, and a service
that may show one tenant another's rows stops taking calls rather than go on leaking; the
alert pages the human. The process's status (``""``, liveness) stays SERVING: a restart
would not mend a policy.

The canary ids are reserved (the registry refuses to create them, ``hosts.RESERVED_TENANT_IDS``)
and left out of tenant listings. The registry keeps a tenant record of each (its other
tables reference it), SUSPENDED, so no call is ever served as one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncpg

from . import context, metrics
from .db import UNREACHABLE, Database

log = logging.getLogger("towerco.canary")

#: The two reserved tenants (defined with the platform's own tenant in the context module).
CANARY_TENANTS = context.CANARY_TENANTS
CANARY_A, CANARY_B = CANARY_TENANTS

#: Sentinels of the tables every service with the shared ``tenant_data`` bookkeeping has
#: (the sites service has the same tables from its own migration). ``$1``: the canary.
SHARED_SENTINELS: Mapping[str, str] = {
    "tenant_migrations": "INSERT INTO {schema}.tenant_migrations "
    "(tenant_id, migration_id, data_type, source_tenant_id, row_count) "
    "VALUES ($1, 'isolation-canary', 'sentinel', $1, 0) ON CONFLICT DO NOTHING",
    "tenant_migration_rows": "INSERT INTO {schema}.tenant_migration_rows "
    "(tenant_id, migration_id, data_type, row_key) "
    "VALUES ($1, 'isolation-canary', 'sentinel', '{{sentinel}}') ON CONFLICT DO NOTHING",
}
#: Tenant tables checked without a sentinel of their own, and why: the audit relay
#: delivers and deletes every tenant's outbox rows (a sentinel would reach the audit log
#: and be gone). The check still finds any other tenant's waiting events there.
UNSEEDED: Mapping[str, str] = {"audit_outbox": "drained by the audit relay"}

# Tables of the schema holding tenant rows (partitions are reached through their parent).
TENANT_TABLES_SQL = """
SELECT c.relname
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped
WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition
ORDER BY c.relname
"""


#: What keeps a round from checking (the database down or refusing): not a breach, logged.
_CHECK_FAILURES: tuple[type[BaseException], ...] = (asyncpg.PostgresError, *UNREACHABLE)


_OWN_SQL = "SELECT EXISTS (SELECT 1 FROM {} WHERE tenant_id = $1)"


class CanaryError(RuntimeError):
    """A tenant table has no sentinel, so the canary could not prove it isolated (a start-up error)."""


Report = Callable[[bool], Awaitable[None]]


class IsolationCanary:
    """Seeds the canaries' sentinels in one service's schema and checks them every ``interval`` seconds."""

    def __init__(
        self, db: Database, schema: str, sentinels: Mapping[str, str], interval: float, report: Report
    ) -> None:
        self._db = db
        self._schema = schema
        self._sentinels = {**sentinels, **SHARED_SENTINELS}
        self._interval = interval
        #: Called with False on a breach and True when a later round is clean again.
        self._report = report
        self.tables: tuple[str, ...] = ()
        self.breached = False
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = ""

    def start(self) -> None:
        """Check in the background, a first round at once (after :meth:`seed`)."""
        self._task = asyncio.create_task(self._run(), name="isolation-canary")
        log.info("isolation canary: %d tables of %s checked every %gs", len(self.tables), self._schema, self._interval)

    async def seed(self) -> None:
        """Write each canary's sentinel into every tenant table of every cell (idempotent).

        A cell other than the home one that cannot be reached now is seeded by the first
        round that reaches it (its outage is logged where it is met).
        """
        await self._db.in_each_cell(self._seed_cell)

    async def _seed_cell(self, cell: str = "") -> None:
        """Write each canary's sentinel into every tenant table (idempotent: ON CONFLICT DO NOTHING)."""
        with context.system_scope(CANARY_A, "canary.tables"):
            async with self._db.transaction(readonly=True) as conn:
                self.tables = tuple(r["relname"] for r in await conn.fetch(TENANT_TABLES_SQL, self._schema))
        missing = [t for t in self.tables if t not in self._sentinels and t not in UNSEEDED]
        if missing:
            raise CanaryError(
                f"tenant tables of {self._schema} without an isolation-canary sentinel: {', '.join(missing)}; "
                "add their INSERT to the service's canary sentinels"
            )
        for tenant_id in CANARY_TENANTS:
            with context.system_scope(tenant_id, "canary.seed"):
                async with self._db.transaction() as conn:
                    for table, insert in self._sentinels.items():
                        if table in self.tables:
                            await conn.execute(insert.format(schema=self._schema), tenant_id)

    async def check(self) -> list[str]:
        """One round in each cell; returns what it saw that it must not (empty: isolated).

        A cell other than the home one that cannot be reached is left for the next round.
        """
        found = await self._db.in_each_cell(self._check_cell)
        return [finding for in_cell in found for finding in in_cell]

    async def _check_cell(self, cell: str) -> list[str]:
        """One round as each canary in turn; returns what it saw that it must not (empty: isolated).

        A canary that no longer sees its own sentinel somewhere (removed by hand, say) gets it
        written again: without it, the other's lookup by tenant there would prove nothing.
        """
        findings: list[str] = []
        missing: list[str] = []
        for me, other in ((CANARY_A, CANARY_B), (CANARY_B, CANARY_A)):
            with context.system_scope(me, "canary.check"):
                async with self._db.transaction(readonly=True) as conn:
                    for table in self.tables:
                        findings.extend(await self._check_table(conn, table, me, other))
                        if table not in UNSEEDED and not await conn.fetchval(_OWN_SQL.format(self._name(table)), me):
                            missing.append(f"{me} in {self._name(table)}")
        if missing:
            log.warning("isolation canary: sentinels missing (%s); writing them again", ", ".join(missing))
            await self._seed_cell()
        return [f"cell {cell}: {finding}" for finding in findings] if len(self._db.cells) > 1 else findings

    def _name(self, table: str) -> str:
        return f"{self._schema}.{table}"  # both from the catalog, never from a caller

    async def _check_table(self, conn: asyncpg.Connection[Any], table: str, me: str, other: str) -> list[str]:
        name = self._name(table)
        found = []
        filtered = await conn.fetchval(f"SELECT count(*) FROM {name} WHERE tenant_id = $1", other)
        if filtered:
            found.append(f"as {me}, {name}: {filtered} row(s) of {other} by tenant_id = '{other}'")
        # No condition on the bound tenant: only RLS keeps every other tenant out.
        stranger = await conn.fetchval(f"SELECT tenant_id FROM {name} WHERE tenant_id IS DISTINCT FROM $1 LIMIT 1", me)
        if stranger is not None:
            found.append(f"as {me}, {name}: unfiltered, shows tenant {stranger!r}'s rows")
        return found

    async def _run(self) -> None:
        while True:
            await self._round()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._interval)
            if self._stop.is_set():
                return

    async def _round(self) -> None:
        try:
            findings = await self.check()
        except _CHECK_FAILURES as exc:
            # An unreachable database is already logged as an outage; anything else once until it changes.
            if str(exc) != self._failing and not isinstance(exc, UNREACHABLE):
                log.error("isolation canary: cannot check %s: %s", self._schema, exc)
            self._failing = str(exc)
            return
        self._failing = ""
        if findings:
            for finding in findings:
                metrics.active().isolation_breach()
                log.critical("TENANT ISOLATION BREACH: %s", finding)
            if not self.breached:
                self.breached = True
                await self._report(False)
        elif self.breached:
            self.breached = False
            log.warning("isolation canary: %s isolated again; the breach above still needs looking into", self._schema)
            await self._report(True)

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
