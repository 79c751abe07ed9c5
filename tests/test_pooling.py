"""A small pool shared by many interleaved calls of different tenants never mixes them up.

The tenant is bound per transaction (``set_config(..., true)``), so a pooled connection
reused by the next call carries nothing over, whatever the interleaving.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc

from services.runtime import context
from services.runtime.context import RequestContext
from services.runtime.db import Database

from .support import bearer
from .support.requests import set_limit

SITES_PER_TENANT = 4


@pytest.fixture
async def three_tenants(admin_dsn: str, tenant_pair: tuple[str, str]) -> AsyncIterator[list[str]]:
    """Three fresh tenants, each with the same site ids but its own names."""
    tenants = [*tenant_pair, f"tc_{uuid.uuid4().hex[:10]}"]
    conn: asyncpg.Connection[Any] = await asyncpg.connect(admin_dsn)
    try:
        for tenant in tenants:
            for i in range(SITES_PER_TENANT):
                await conn.execute(
                    "INSERT INTO sites.sites (tenant_id, site_id, name) VALUES ($1, $2, $3)",
                    tenant,
                    f"S-{i}",
                    f"{tenant} site {i}",
                )
        yield tenants
    finally:
        await conn.execute("DELETE FROM sites.sites WHERE tenant_id = ANY($1::text[])", tenants)
        await conn.close()


def site_ids() -> list[str]:
    return [f"S-{i}" for i in range(SITES_PER_TENANT)]


async def test_interleaved_tasks_see_only_their_tenant(sites_runtime_dsn, three_tenants):
    # Generous acquire timeout: 300 tasks queue for 2 connections; we test isolation, not speed.
    db = await Database.connect(sites_runtime_dsn, min_size=1, max_size=2, acquire_timeout=60)
    rng = random.Random(1234)

    async def one(i: int, tenant: str) -> tuple[str, int, list[str], str | None, list[str]]:
        with context.bind(RequestContext(request_id=f"req-{i}", method="/test/Pool", tenant_id=tenant)):
            async with db.transaction(readonly=i % 2 == 0) as conn:
                seen = [r["tenant_id"] for r in await conn.fetch("SELECT DISTINCT tenant_id FROM sites.sites")]
                await asyncio.sleep(0)
                setting = await conn.fetchval("SELECT current_setting('app.current_tenant_id', true)")
                await asyncio.sleep(0)
                names = [r["name"] for r in await conn.fetch("SELECT name FROM sites.sites ORDER BY site_id")]
                pid = await conn.fetchval("SELECT pg_backend_pid()")
                if i % 7 == 0:
                    # A failing call rolls back; its connection goes back to the pool all the same.
                    with pytest.raises(asyncpg.UndefinedTableError):
                        await conn.fetch("SELECT * FROM sites.no_such_table")
                    raise _AbortError(i)
            return tenant, pid, seen, setting, names

    async def guarded(i: int, tenant: str) -> tuple[str, int, list[str], str | None, list[str]] | int:
        try:
            return await one(i, tenant)
        except _AbortError as abort:
            return abort.index

    try:
        plan = [(i, rng.choice(three_tenants)) for i in range(300)]
        results = await asyncio.gather(*(guarded(i, t) for i, t in plan))
        # After everything, both pooled connections, used outside db.transaction(), carry no
        # tenant and see nothing: no session-level leftovers.
        async with db._pool.acquire() as raw1, db._pool.acquire() as raw2:
            for raw in (raw1, raw2):
                assert await raw.fetchval("SELECT current_setting('app.current_tenant_id', true)") in (None, "")
                assert await raw.fetch("SELECT * FROM sites.sites") == []
    finally:
        await db.close()

    aborted = [r for r in results if isinstance(r, int)]
    completed = [r for r in results if not isinstance(r, int)]
    assert sorted(aborted) == [i for i, _ in plan if i % 7 == 0]
    assert len(completed) == 300 - len(aborted)
    tenants_by_pid: dict[int, set[str]] = {}
    for tenant, pid, seen, setting, names in completed:
        assert seen == [tenant]
        assert setting == tenant
        assert names == [f"{tenant} site {i}" for i in range(SITES_PER_TENANT)]
        tenants_by_pid.setdefault(pid, set()).add(tenant)
    # The test is only meaningful if connections really were shared between tenants.
    assert len(tenants_by_pid) <= 2
    assert any(len(t) > 1 for t in tenants_by_pid.values())
    assert set(Counter(t for t, *_ in completed)) == set(three_tenants)


async def test_cancelled_transaction_leaves_no_tenant_behind(sites_runtime_dsn, three_tenants):
    """A call cancelled mid-transaction (deadline, client gone) releases a clean connection."""
    db = await Database.connect(sites_runtime_dsn, min_size=1, max_size=1, acquire_timeout=60)
    tenant_a, tenant_b, _ = three_tenants
    inside = asyncio.Event()
    never = asyncio.Event()

    async def stuck() -> None:
        with context.bind(RequestContext(request_id="stuck", method="/test/Pool", tenant_id=tenant_a)):
            async with db.transaction() as conn:
                await conn.execute("UPDATE sites.sites SET name = 'changed by a cancelled call'")
                inside.set()
                await never.wait()

    try:
        task = asyncio.create_task(stuck())
        await inside.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The one connection is reused by tenant B: it sees B only, and A's update was rolled back.
        with context.bind(RequestContext(request_id="next", method="/test/Pool", tenant_id=tenant_b)):
            async with db.transaction(readonly=True) as conn:
                seen = [r["tenant_id"] for r in await conn.fetch("SELECT DISTINCT tenant_id FROM sites.sites")]
        with context.bind(RequestContext(request_id="check", method="/test/Pool", tenant_id=tenant_a)):
            async with db.transaction(readonly=True) as conn:
                names = [r["name"] for r in await conn.fetch("SELECT name FROM sites.sites ORDER BY site_id")]
    finally:
        await db.close()
    assert seen == [tenant_b]
    assert names == [f"{tenant_a} site {i}" for i in range(SITES_PER_TENANT)]


class _AbortError(Exception):
    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


# --- Through the service, with a pool of two ---------------------------------------------


@pytest.fixture
def small_pool_sites(extra_sites) -> Any:
    """A second sites process whose pool has at most two connections; yields its target.

    Calls queue for a connection (and for their tenant's one slot of it) instead of being
    refused: this test is about what a reused connection carries, not about overload.
    """
    extra = extra_sites(
        {
            "DB_POOL_MAX_SIZE": "2",
            "DB_POOL_MIN_SIZE": "1",
            "DB_ACQUIRE_TIMEOUT_SECONDS": "60",
            "TENANT_CONCURRENCY_WAIT_SECONDS": "60",
        }
    )
    return extra.target, extra.process


async def test_service_with_small_pool_keeps_tenants_apart(
    small_pool_sites, three_tenants, token, features, platform_token
):
    target, process = small_pool_sites
    rng = random.Random(4321)
    tokens = {tenant: token(tenant) for tenant in three_tenants}
    for tenant in three_tenants:  # calls queue here rather than meet fair share's bound on calls in flight
        set_limit(features, platform_token, tenant, "call_concurrency", -1)

    async with grpc.aio.insecure_channel(target) as channel:
        stub = sites_service_pb2_grpc.SiteServiceStub(channel)

        async def call(i: int, tenant: str) -> tuple[str, str, list[tuple[str, str, str]]]:
            md = bearer(tokens[tenant])
            if i % 2 == 0:
                reply = await stub.ListSites(pb.ListSitesRequest(page_size=50), metadata=md, timeout=60)
                return tenant, "list", [(s.tenant_id, s.site_id, s.name) for s in reply.sites]
            site_id = f"S-{i % SITES_PER_TENANT}"
            site = await stub.GetSite(pb.GetSiteRequest(site_id=site_id), metadata=md, timeout=60)
            return tenant, site_id, [(site.tenant_id, site.site_id, site.name)]

        plan = [(i, rng.choice(three_tenants)) for i in range(200)]
        results = await asyncio.gather(*(call(i, t) for i, t in plan))

    assert len(results) == 200
    for tenant, kind, sites in results:
        if kind == "list":
            assert sites == [(tenant, sid, f"{tenant} site {n}") for n, sid in enumerate(site_ids())]
        else:
            n = int(kind.split("-")[1])
            assert sites == [(tenant, kind, f"{tenant} site {n}")]
    assert {tenant for tenant, _, _ in results} == set(three_tenants)
    assert process.poll() is None


async def test_commit_behind_leaves_before_its_commit_and_holds_the_connection_until_it_ends(
    sites_runtime_dsn, three_tenants
):
    db = await Database.connect(sites_runtime_dsn, min_size=1, max_size=1, acquire_timeout=5)
    tenant = three_tenants[0]
    try:
        with context.bind(RequestContext(request_id="req-behind", method="/test/Pool", tenant_id=tenant)):
            async with db.transaction(readonly=True, commit_behind=True) as conn:
                names = [r["name"] for r in await conn.fetch("SELECT name FROM sites.sites ORDER BY site_id")]
            # Out of the block before the COMMIT's round trip: still in the transaction, the connection held.
            assert conn.is_in_transaction()
            await db.committed()
            # The pool's one connection came back with its transaction ended: the next one runs on it.
            async with db.transaction(readonly=True) as again:
                assert await again.fetchval("SELECT current_setting('app.current_tenant_id', true)") == tenant
                assert await again.fetchval("SELECT count(*) FROM sites.sites") == SITES_PER_TENANT
            # A block that raises rolls back before it leaves, as any transaction does: nothing ends behind it.
            with pytest.raises(_AbortError):
                async with db.transaction(readonly=True, commit_behind=True) as failed:
                    await failed.fetchval("SELECT 1")
                    raise _AbortError(0)
            assert not db._committing
        assert names == [f"{tenant} site {i}" for i in range(SITES_PER_TENANT)]
        with pytest.raises(ValueError, match="read-only"):
            db.transaction(commit_behind=True)
    finally:
        await db.close()
