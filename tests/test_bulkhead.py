"""Per-tenant bulkheads over one real pool: a tenant holding all its slots does not stall the others."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from towerco.features.v1 import feature_gate_service_pb2 as features_pb
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc

from services.runtime import bulkhead, context
from services.runtime.db import Database
from services.runtime.errors import ServiceError

from .support import bearer, expect_error


def as_tenant(tenant_id: str) -> Any:
    return context.bind(context.RequestContext(request_id=f"bulkhead-{tenant_id}", method="test", tenant_id=tenant_id))


async def hold(db: Database, tenant_id: str, limit: int, release: asyncio.Event, holding: asyncio.Event) -> None:
    with as_tenant(tenant_id), bulkhead.limited(limit):
        async with db.transaction() as conn:
            await conn.fetchval("SELECT 1")
            holding.set()
            await release.wait()


async def test_a_tenant_at_its_limit_waits_briefly_then_is_refused_while_others_go_on(sites_runtime_dsn):
    # A pool of 4 and a short acquire timeout: without the bulkhead, tenant A's four slow
    # transactions would take every connection and tenant B would fail DATABASE_BUSY.
    db = await Database.connect(sites_runtime_dsn, min_size=4, max_size=4, acquire_timeout=0.5, tenant_wait_seconds=0.2)
    release = asyncio.Event()
    try:
        holders = []
        for _ in range(3):  # A's plan allows 5; the bulkhead's ceiling is the pool but one
            holding = asyncio.Event()
            holders.append(asyncio.create_task(hold(db, "tenant_a", 5, release, holding)))
            await asyncio.wait_for(holding.wait(), 5)
        assert db.bulkhead is not None and db.bulkhead.in_use("tenant_a") == 3

        with pytest.raises(ServiceError) as refused:
            await hold(db, "tenant_a", 5, release, asyncio.Event())
        assert (refused.value.code, refused.value.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TENANT_CONCURRENCY_LIMIT",
        )
        assert refused.value.retry_after_seconds is not None

        # Tenant B still gets a connection at once (the pool's last one).
        with as_tenant("tenant_b"), bulkhead.limited(5):
            async with db.transaction() as conn:
                assert await conn.fetchval("SELECT current_setting('app.current_tenant_id')") == "tenant_b"

        # A waiter gets the slot a holder frees within the wait.
        got_in, second_release = asyncio.Event(), asyncio.Event()
        waiter = asyncio.create_task(hold(db, "tenant_a", 5, second_release, got_in))
        await asyncio.sleep(0.05)
        assert not got_in.is_set()
        release.set()
        await asyncio.wait_for(got_in.wait(), 5)
        second_release.set()
        await asyncio.gather(*holders, waiter)
        assert db.bulkhead.in_use("tenant_a") == 0
    finally:
        release.set()
        await db.close()


async def test_the_plan_limit_applies_below_the_ceiling(sites_runtime_dsn):
    db = await Database.connect(sites_runtime_dsn, min_size=1, max_size=10, tenant_wait_seconds=0.1)
    release = asyncio.Event()
    try:
        holding = asyncio.Event()
        holder = asyncio.create_task(hold(db, "tenant_a", 1, release, holding))
        await asyncio.wait_for(holding.wait(), 5)
        with pytest.raises(ServiceError) as refused:
            await hold(db, "tenant_a", 1, release, asyncio.Event())
        assert refused.value.metadata["limit"] == "1"
        release.set()
        await holder
        # Without a limit in the context (platform and background work) there is no bulkhead.
        with as_tenant("tenant_a"):
            async with db.transaction() as conn, db.transaction() as second:
                assert await conn.fetchval("SELECT 1") == await second.fetchval("SELECT 1") == 1
    finally:
        release.set()
        await db.close()


def test_the_chain_applies_the_tenants_db_concurrency(sites, features, new_tenant, token, platform_token, eventually):
    tenant, other = new_tenant(plan="basic"), new_tenant(plan="basic")
    md = bearer(token(tenant))
    sites.ListSites(pb.ListSitesRequest(), metadata=md, timeout=10)
    # No connection at all for this tenant: every call that needs the database is refused.
    features.SetLimitOverride(
        features_pb.SetLimitOverrideRequest(tenant_id=tenant, resource="db_concurrency", limit=0),
        metadata=bearer(platform_token),
        timeout=10,
    )

    def refused() -> None:
        error = expect_error(sites.ListSites, pb.ListSitesRequest(), metadata=md)
        assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TENANT_CONCURRENCY_LIMIT"), error

    eventually(refused)
    sites.ListSites(pb.ListSitesRequest(), metadata=bearer(token(other)), timeout=10)


async def test_a_tenants_slow_calls_do_not_delay_another_tenant(extra_sites, new_tenant, token):
    # Professional plans allow 10 connections; in a pool of 4 the ceiling is 3. Each
    # GetSiteAnalytics here holds its connection for 3 s (an armed test delay).
    busy, calm = new_tenant(plan="professional"), new_tenant(plan="professional")
    extra = extra_sites(
        {
            "DB_POOL_MAX_SIZE": "4",
            "DB_POOL_MIN_SIZE": "4",
            "DB_ACQUIRE_TIMEOUT_SECONDS": "10",
            "FAULT_POINTS": "sites.analytics@3",
        }
    )
    busy_md, calm_md = bearer(token(busy)), bearer(token(calm))
    async with grpc.aio.insecure_channel(extra.target) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        for md in (busy_md, calm_md):  # the process now knows both tenants
            await stub.ListSites(pb.ListSitesRequest(), metadata=md, timeout=10)

        slow = [
            asyncio.ensure_future(stub.GetSiteAnalytics(pb.GetSiteAnalyticsRequest(), metadata=busy_md, timeout=20))
            for _ in range(6)
        ]
        # Three hold the tenant's slots; the other three are refused after a short wait.
        done, pending = await asyncio.wait(slow, timeout=2.5, return_when=asyncio.FIRST_EXCEPTION)
        while len(done) < 3:
            more, pending = await asyncio.wait(pending, timeout=2.5, return_when=asyncio.FIRST_EXCEPTION)
            assert more, "the calls over the tenant's limit were not refused"
            done |= more
        assert len(pending) == 3
        for task in done:
            error = task.exception()
            assert isinstance(error, grpc.aio.AioRpcError), error
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error

        # The calm tenant is served while the busy one still holds all it may.
        await stub.ListSites(pb.ListSitesRequest(), metadata=calm_md, timeout=10)
        await stub.CreateSite(pb.CreateSiteRequest(site_id="CALM-1", site=pb.Site(name="c")), metadata=calm_md)
        assert all(not task.done() for task in pending), "the calm tenant waited for the busy one"

        replies = await asyncio.gather(*pending)
        assert [r.total_sites for r in replies] == [0, 0, 0]
