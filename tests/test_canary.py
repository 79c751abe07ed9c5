"""The isolation canary: reserved canary tenants whose sentinels each service checks it cannot cross.

A healthy stack's four services see no breach; a policy broken on purpose, in a PostgreSQL
server of the test's own, is caught by a sites process of the test's own within a few
canary intervals: the breach counter on ``/metrics``, a CRITICAL line naming the table,
and NOT_SERVING for the service's names on the health check (the overall status stays
SERVING). The alert on the counter (TenantIsolationBreach) is proved by the rules' own
``promtool test rules``. The canaries can be neither created nor listed.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb

from deploy.local.dsn import runtime_dsn
from deploy.local.stack import Stack, service_spec
from services.runtime import context
from services.runtime.canary import CANARY_A, CANARY_B, CANARY_TENANTS, UNSEEDED, CanaryError, IsolationCanary
from services.runtime.db import Database
from services.runtime.server import migrate_service

from .support import bearer, expect_error, free_port
from .test_outage_logging import PrivatePostgres, private_postgres  # noqa: F401 - the fixture

SERVICES = ("tenant", "sites", "features", "audit")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
BREACHES = re.compile(r'^towerco_isolation_breach_total\{service="sites"\} (\S+)$', re.MULTILINE)


async def _never(isolated: bool) -> None:
    raise AssertionError(f"the canary reported isolated={isolated} in a test that reports nothing")


@pytest.fixture
async def canaries(stack: Stack) -> AsyncIterator[dict[str, IsolationCanary]]:
    """Each service's canary, on a pool of its own as the service's runtime role."""
    opened: dict[str, IsolationCanary] = {}
    pools: list[Database] = []
    try:
        for name in SERVICES:
            db = await Database.connect(stack.runtime_dsn(name), min_size=1, max_size=1)
            pools.append(db)
            spec = service_spec(name)
            opened[name] = IsolationCanary(db, spec.schema, spec.sentinels, 1.0, _never)
            await opened[name].seed()  # idempotent: the running services seeded them already
        yield opened
    finally:
        for db in pools:
            await db.close()


@pytest.mark.stack
async def test_a_healthy_stack_reports_no_breach(stack: Stack, canaries: dict[str, IsolationCanary]) -> None:
    for name, canary in canaries.items():
        assert canary.tables, f"{name}: the canary found no tenant tables to check"
        assert await canary.check() == [], name
    for name in SERVICES:
        with grpc.insecure_channel(f"127.0.0.1:{stack.config.ports[name]}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for descriptor in service_spec(name).services:
                reply = health.Check(health_pb2.HealthCheckRequest(service=descriptor.full_name), timeout=5)
                assert reply.status == SERVING, f"{descriptor.full_name} is not SERVING"


@pytest.mark.stack
async def test_each_canary_sees_its_own_sentinels_and_none_of_the_other(
    canaries: dict[str, IsolationCanary],
) -> None:
    # The canary's door (context.system_scope): each canary's transaction shows its own
    # sentinel in every seeded table, and no row of the other canary's.
    for name, canary in canaries.items():
        db = canary._db
        for tenant_id in CANARY_TENANTS:
            with context.system_scope(tenant_id, "test.canary"):
                async with db.transaction(readonly=True) as conn:
                    for table in canary.tables:
                        rows = await conn.fetch(
                            f"SELECT DISTINCT tenant_id FROM {canary._schema}.{table} WHERE tenant_id = ANY($1)",
                            list(CANARY_TENANTS),
                        )
                        expected = set() if table in UNSEEDED else {tenant_id}
                        assert {r["tenant_id"] for r in rows} == expected, f"{name}: {table} as {tenant_id}"


@pytest.mark.stack
async def test_the_canaries_cannot_be_created(registry: Any, platform_token: str) -> None:
    for tenant_id in CANARY_TENANTS:
        request = tenant_pb.CreateTenantRequest(
            tenant_id=tenant_id,
            tenant=tenant_pb.Tenant(display_name="Impostor", plan="basic", admin_email="x@example.com"),
        )
        error = expect_error(registry.CreateTenant, request, metadata=bearer(platform_token))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
        assert "reserved" in error.message, error


@pytest.mark.stack
async def test_the_canaries_cannot_be_suspended_reactivated_or_deleted(registry: Any, platform_token: str) -> None:
    for tenant_id in CANARY_TENANTS:
        for method, request in (
            (registry.SuspendTenant, tenant_pb.SuspendTenantRequest(tenant_id=tenant_id, reason="test")),
            (registry.ReactivateTenant, tenant_pb.ReactivateTenantRequest(tenant_id=tenant_id)),
            (registry.DeleteTenant, tenant_pb.DeleteTenantRequest(tenant_id=tenant_id)),
        ):
            error = expect_error(method, request, metadata=bearer(platform_token))
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
            assert "isolation canary" in error.message, error


@pytest.mark.stack
async def test_no_host_or_branding_leads_to_a_canary(registry: Any) -> None:
    for tenant_id in CANARY_TENANTS:
        for host in (f"{tenant_id}.localhost", f"{tenant_id.replace('_', '-')}.isolation-canary.invalid"):
            error = expect_error(registry.ResolveTenant, tenant_pb.ResolveTenantRequest(host=host))
            assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "HOST_NOT_FOUND"), (host, error)
        error = expect_error(registry.GetBranding, tenant_pb.GetBrandingRequest(tenant_id=tenant_id))
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "TENANT_NOT_FOUND"), error


@pytest.mark.stack
async def test_a_missing_sentinel_is_written_again(
    canaries: dict[str, IsolationCanary], admin: asyncpg.Connection[Any]
) -> None:
    await admin.execute("DELETE FROM sites.sites WHERE tenant_id = $1", CANARY_B)
    assert await canaries["sites"].check() == []
    assert await admin.fetchval("SELECT count(*) FROM sites.sites WHERE tenant_id = $1", CANARY_B) == 1


@pytest.mark.stack
async def test_a_tenant_table_without_a_sentinel_stops_the_start(canaries: dict[str, IsolationCanary]) -> None:
    bare = IsolationCanary(canaries["sites"]._db, "sites", {}, 1.0, _never)
    with pytest.raises(CanaryError, match="without an isolation-canary sentinel: create_requests, sites;"):
        await bare.seed()


@pytest.mark.stack
async def test_the_canaries_are_left_out_of_tenant_lists(
    registry: Any, platform_token: str, admin: asyncpg.Connection[Any]
) -> None:
    stored = await admin.fetch("SELECT tenant_id FROM tenant.tenants WHERE tenant_id = ANY($1)", list(CANARY_TENANTS))
    assert {r["tenant_id"] for r in stored} == set(CANARY_TENANTS), "the registry holds both canaries' records"
    listed: list[str] = []
    token = ""
    while True:
        request = tenant_pb.ListTenantsRequest(page_size=100, page_token=token, show_deleted=True)
        reply = registry.ListTenants(request, metadata=bearer(platform_token), timeout=10)
        listed += [t.tenant_id for t in reply.tenants]
        token = reply.next_page_token
        if not token:
            break
    assert "platform" in listed, "the listing is not the whole registry"
    assert not set(CANARY_TENANTS) & set(listed)


@pytest.mark.stack
def test_the_canaries_are_in_no_tenant_metric(stack: Stack, canaries: dict[str, IsolationCanary]) -> None:
    # Every service has written and checked the canaries' rows by now (the fixture's seed too,
    # in this process): their database time is the platform's, not a tenant's to be billed.
    for name in SERVICES:
        exposition = _scrape(stack.config.metrics_ports[name])
        assert "# TYPE towerco_tenant_db_seconds_total counter" in exposition, f"{name}: not its metrics"
        for tenant_id in CANARY_TENANTS:
            assert f'tenant="{tenant_id}"' not in exposition, f"{name} counts {tenant_id} as a tenant"


def _scrape(metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def _health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(reply.status)


def _breaches(metrics_port: int) -> float:
    found = BREACHES.search(_scrape(metrics_port))
    return float(found.group(1)) if found else 0.0


@pytest.mark.stack
def test_a_policy_broken_on_purpose_is_caught_within_the_canary_interval(
    stack: Stack,
    private_postgres: PrivatePostgres,  # noqa: F811 - the fixture imported above
    extra_service: Callable[..., Any],
    eventually: Callable[..., Any],
) -> None:
    asyncio.run(migrate_service(service_spec("sites"), private_postgres.dsn, stack.app_db_password))
    metrics_port = free_port()
    sites = extra_service(
        "sites",
        {
            "SITES_DATABASE_URL": runtime_dsn(private_postgres.dsn, "sites", stack.app_db_password),
            "CANARY_INTERVAL_SECONDS": "0.2",
            "SITES_METRICS_PORT": str(metrics_port),
        },
    )
    names = [d.full_name for d in service_spec("sites").services]
    assert [_health(sites.target, name) for name in names] == [SERVING] * len(names)
    assert _breaches(metrics_port) == 0

    # The policy stays in place (the start-up guard would accept it): only what it lets through changes.
    asyncio.run(_admin(private_postgres.dsn, "ALTER POLICY tenant_isolation ON sites.sites USING (true)"))

    def caught() -> float:
        assert [_health(sites.target, name) for name in names] == [NOT_SERVING] * len(names)
        assert "CRITICAL" in sites.output() and "TENANT ISOLATION BREACH" in sites.output()
        count = _breaches(metrics_port)
        assert count > 0
        return count

    eventually(caught, within=20, interval=0.1)
    assert _health(sites.target, "") == SERVING, "the overall status is left to the operator"
    breach_lines = [line for line in sites.output().splitlines() if "TENANT ISOLATION BREACH" in line]
    assert all(" CRITICAL " in line for line in breach_lines), breach_lines
    assert any(f"sites.sites: 1 row(s) of {CANARY_B}" in line for line in breach_lines), breach_lines
    assert any(f"sites.sites: unfiltered, shows tenant '{CANARY_B}'" in line for line in breach_lines), breach_lines
    assert not any("sites.create_requests" in line for line in breach_lines), "only the broken table is named"
    assert CANARY_A in breach_lines[0]

    # Repaired: the service names serve again; the counter (and so the alert's history) stays.
    asyncio.run(
        _admin(
            private_postgres.dsn,
            "ALTER POLICY tenant_isolation ON sites.sites "
            "USING (tenant_id = current_setting('app.current_tenant_id', true))",
        )
    )
    eventually(lambda: _assert_serving(sites.target, names), within=20, interval=0.1)
    assert _breaches(metrics_port) > 0

    # Row-level security turned off on another table: caught there too, by the unfiltered query
    # as well as the filtered one.
    asyncio.run(_admin(private_postgres.dsn, "ALTER TABLE sites.create_requests DISABLE ROW LEVEL SECURITY"))
    eventually(lambda: _assert_breach_named(sites, names, "sites.create_requests"), within=20, interval=0.1)


def _assert_serving(target: str, names: list[str]) -> None:
    assert [_health(target, name) for name in names] == [SERVING] * len(names)


def _assert_breach_named(sites: Any, names: list[str], table: str) -> None:
    assert [_health(sites.target, name) for name in names] == [NOT_SERVING] * len(names)
    lines = [line for line in sites.output().splitlines() if "TENANT ISOLATION BREACH" in line and table in line]
    assert any("unfiltered" in line for line in lines), lines


async def _admin(dsn: str, statement: str) -> None:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()
