"""The pieces under the services are the real thing, and each process keeps one pool."""

from __future__ import annotations

import asyncio
from typing import Any

import redis
from grpc import aio
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as pb_grpc

from .support import bearer
from .support.requests import set_limit


def test_redis_is_a_real_server(stack):
    client = redis.Redis.from_url(stack.redis_url)
    try:
        info = client.info("server")
        assert int(info["redis_version"].split(".")[0]) >= 6
        assert client.set("stack-check", "1", px=5000) is True
        assert client.get("stack-check") == b"1"
    finally:
        client.close()


async def test_postgres_is_a_real_server_with_row_security(admin):
    version = await admin.fetchval("SHOW server_version_num")
    assert int(version) >= 150000
    assert await admin.fetchval("SHOW row_security") == "on"


async def test_one_pool_per_process_made_at_start_up(extra_sites, admin, token, tenant_pair, features, platform_token):
    extra = extra_sites({"DB_POOL_MIN_SIZE": "2", "DB_POOL_MAX_SIZE": "2"})
    name = f"towerco-sites/{extra.process.pid}"
    query = "SELECT pid, backend_start FROM pg_stat_activity WHERE application_name = $1 ORDER BY pid"
    at_start = [tuple(r) for r in await admin.fetch(query, name)]
    assert len(at_start) == 2, at_start  # the pool's two connections, opened before serving

    tenant, _ = tenant_pair
    # 50 calls at once: more than a plan's calls in flight (fair share), which is not what this test is about.
    set_limit(features, platform_token, tenant, "call_concurrency", -1)
    md = bearer(token(tenant))
    async with aio.insecure_channel(extra.target) as channel:
        stub = pb_grpc.SiteServiceStub(channel)
        await stub.CreateSite(pb.CreateSiteRequest(site_id="POOL-1", site=pb.Site(name="p")), metadata=md)
        for _ in range(50):
            await stub.GetSite(pb.GetSiteRequest(site_id="POOL-1"), metadata=md)
        await asyncio.gather(*(stub.ListSites(pb.ListSitesRequest(), metadata=md) for _ in range(50)))

    after: list[Any] = [tuple(r) for r in await admin.fetch(query, name)]
    # Same backends, same start times: no connection (let alone a pool) was made per request.
    assert after == at_start
