"""Usage records and tenant tombstones are deleted on their own once past their period (README "Data lifecycle").

A feature gate (registry) process of the test's own runs the retention task with short settings and a
0.3 s interval; rows are backdated as a superuser. The periods are thousands of days so the
process touches only this test's rows in the shared database.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg

from deploy.local.stack import Stack

from .support import free_port
from .support.processes import ExtraService
from .test_metrics import scrape_port, values

HOURLY = "features.usage_hourly"
FLUSHES = "features.usage_flushes"
SETTINGS = {
    "USAGE_RETENTION_DAYS": "3600",
    "USAGE_FLUSH_RECORD_DAYS": "3000",
    "RETENTION_PURGE_INTERVAL_SECONDS": "0.3",
}
#: Hours by age in days: 4000 is past USAGE_RETENTION_DAYS, 3500 and 0 are not.
OLD_HOURS, KEPT_HOURS = (4000,), (3500, 0)
#: Flush ids by age in days: 3100 is past USAGE_FLUSH_RECORD_DAYS, 2900 and 0 are not.
OLD_FLUSHES, KEPT_FLUSHES = (3100, 3100), (2900, 0)
COUNTERS = ("read_calls", "write_calls", "db_microseconds")


async def arrange(admin: asyncpg.Connection[Any], tenant: str) -> None:
    await admin.executemany(
        f"INSERT INTO {HOURLY} (tenant_id, hour, counter, value) "
        "VALUES ($1, date_trunc('hour', now()) - make_interval(days => $2), $3, 1)",
        [(tenant, days, counter) for days in OLD_HOURS + KEPT_HOURS for counter in COUNTERS],
    )
    await admin.executemany(
        f"INSERT INTO {FLUSHES} (tenant_id, flush_id, received_time) "
        "VALUES ($1, $2, now() - make_interval(days => $3))",
        [(tenant, uuid.uuid4(), days) for days in OLD_FLUSHES + KEPT_FLUSHES],
    )


async def ages(admin: asyncpg.Connection[Any], tenant: str) -> tuple[list[int], list[int]]:
    hours = await admin.fetch(
        f"SELECT round(extract(epoch FROM date_trunc('hour', now()) - hour) / 86400)::int AS days FROM {HOURLY} "
        "WHERE tenant_id = $1 ORDER BY 1 DESC",
        tenant,
    )
    flushes = await admin.fetch(
        f"SELECT round(extract(epoch FROM now() - received_time) / 86400)::int AS days FROM {FLUSHES} "
        "WHERE tenant_id = $1 ORDER BY 1 DESC",
        tenant,
    )
    return [r["days"] for r in hours], [r["days"] for r in flushes]


EXPECTED = (
    [days for days in KEPT_HOURS for _ in COUNTERS],
    list(KEPT_FLUSHES),
)


async def test_the_feature_gate_deletes_usage_past_its_period_per_tenant_and_counts_it(
    extra_service: Callable[..., ExtraService], admin: asyncpg.Connection[Any]
) -> None:
    tenants = [f"ur_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for tenant in tenants:
        await arrange(admin, tenant)
    port = free_port()
    features = extra_service("features", env={**SETTINGS, "FEATURES_METRICS_PORT": str(port)})
    try:
        for _ in range(100):  # a round every 0.3 s; 10 s at most
            if all([await ages(admin, tenant) == EXPECTED for tenant in tenants]):
                break
            await asyncio.sleep(0.1)
        for tenant in tenants:
            assert await ages(admin, tenant) == EXPECTED  # only rows past each period went
        samples = scrape_port(port)
        purged = values(samples, "towerco_retention_purged_rows_total", service="features")
        assert purged[(("table", HOURLY),)] == len(tenants) * len(OLD_HOURS) * len(COUNTERS)
        assert purged[(("table", FLUSHES),)] == len(tenants) * len(OLD_FLUSHES)
        logged = features.log_path.read_text()
        for tenant in tenants:
            assert f"usage records: removed {len(COUNTERS)} from {HOURLY} for tenant {tenant}" in logged, logged[-2000:]
            assert f"usage flush records: removed {len(OLD_FLUSHES)} from {FLUSHES} for tenant {tenant}" in logged
    finally:
        for table in (HOURLY, FLUSHES):
            await admin.execute(f"DELETE FROM {table} WHERE tenant_id = ANY($1)", tenants)


TOMBSTONE_SETTINGS = {"TENANT_TOMBSTONE_DAYS": "3000", "RETENTION_PURGE_INTERVAL_SECONDS": "0.3"}


async def add_tenant(admin: asyncpg.Connection[Any], tenant: str, state: str, days: int) -> None:
    await admin.execute(
        "INSERT INTO tenant.tenants (tenant_id, display_name, state, plan, admin_email, create_time, update_time) "
        "VALUES ($1, 'Tombstone', $2, 'basic', 'noc@tomb.example', "
        "now() - make_interval(days => $3), now() - make_interval(days => $3))",
        tenant,
        state,
        days,
    )


async def test_the_registry_removes_a_tombstone_past_its_period_and_keeps_a_recent_one(
    extra_service: Callable[..., ExtraService], admin: asyncpg.Connection[Any], stack: Stack
) -> None:
    prefix = f"tomb_{uuid.uuid4().hex[:6]}"
    old, old_with_backup, recent, active, held = (
        f"{prefix}_{name}" for name in ("old", "backup", "recent", "active", "held")
    )
    await add_tenant(admin, old, "STATE_DELETED", 3100)
    await add_tenant(admin, old_with_backup, "STATE_DELETED", 3100)
    await admin.execute(  # what may hang off a tombstone: a migration's settings backup
        "INSERT INTO tenant.migration_settings_backup (tenant_id, migration_id, document) VALUES ($1, $2, '{}')",
        old_with_backup,
        uuid.uuid4(),
    )
    await add_tenant(admin, recent, "STATE_DELETED", 2900)
    await add_tenant(admin, active, "STATE_ACTIVE", 3100)  # old, but not deleted
    await add_tenant(admin, held, "STATE_DELETED", 3100)  # old, but under legal hold
    await admin.execute("UPDATE tenant.tenants SET legal_hold = true WHERE tenant_id = $1", held)
    mine = [old, old_with_backup, recent, active, held]
    port = free_port()
    registry = extra_service("tenant", env={**TOMBSTONE_SETTINGS, "TENANT_METRICS_PORT": str(port)})

    async def left() -> set[str]:
        rows = await admin.fetch("SELECT tenant_id FROM tenant.tenants WHERE tenant_id = ANY($1)", mine)
        return {r["tenant_id"] for r in rows}

    try:
        for _ in range(100):  # a round every 0.3 s; 10 s at most
            if await left() == {recent, active, held}:
                break
            await asyncio.sleep(0.1)
        assert await left() == {recent, active, held}
        backups = "SELECT count(*) FROM tenant.migration_settings_backup WHERE tenant_id = $1"
        assert await admin.fetchval(backups, old_with_backup) == 0
        purged = values(scrape_port(port), "towerco_retention_purged_rows_total", service="tenant")
        assert purged[(("table", "tenant.tenants"),)] == 2
        logged = registry.log_path.read_text()
        assert f"tenant tombstones: removed 1 from tenant.tenants for tenant {old}" in logged, logged[-2000:]
        # The runtime role may delete a tenant row only once it is a tombstone (a restrictive policy).
        runtime: asyncpg.Connection[Any] = await asyncpg.connect(stack.runtime_dsn("tenant"))
        try:
            async with runtime.transaction():
                await runtime.execute("SELECT set_config('app.current_tenant_id', $1, true)", active)
                assert await runtime.execute("DELETE FROM tenant.tenants WHERE tenant_id = $1", active) == "DELETE 0"
        finally:
            await runtime.close()
        assert await left() == {recent, active, held}
    finally:
        await admin.execute("DELETE FROM tenant.migration_settings_backup WHERE tenant_id = ANY($1)", mine)
        await admin.execute("DELETE FROM tenant.tenants WHERE tenant_id = ANY($1)", mine)
