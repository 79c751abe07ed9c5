"""Redis connections are bounded per client and named, so ``CLIENT LIST`` shows who holds what."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import redis
from grpc import aio
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as pb_grpc

from .support import bearer

BOUND = 3
#: Concurrent callers, each making calls one after another: more than the bound, fewer than
#: the tenant's database slots (so no call is refused for those).
CALLERS = 16
CALLS = 20


def connections_by_purpose(redis_url: str, pid: int) -> Counter[str]:
    """The process's connections, by the purpose its client names end in."""
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    try:
        clients: list[dict[str, Any]] = client.client_list()
    finally:
        client.close()
    prefix = f"towerco-sites/{pid}/"
    return Counter(c["name"].removeprefix(prefix) for c in clients if c["name"].startswith(prefix))


async def test_a_burst_of_calls_never_opens_more_redis_connections_than_the_bound(
    stack, extra_sites, new_tenant, token
):
    sites = extra_sites({"REDIS_MAX_CONNECTIONS": str(BOUND)})
    tenant = new_tenant(plan="enterprise")  # a finite rate: every call asks Redis for a decision
    md = bearer(token(tenant))
    async with aio.insecure_channel(sites.target) as channel:
        stub = pb_grpc.SiteServiceStub(channel)

        async def caller() -> None:
            for _ in range(CALLS):
                reply = await stub.ListSites(pb.ListSitesRequest(), metadata=md, timeout=30)
                assert len(reply.sites) == 0  # waiting for a Redis connection fails no call

        await asyncio.gather(*(caller() for _ in range(CALLERS)))

    held = connections_by_purpose(stack.redis_url, sites.process.pid)
    assert 1 <= held["ratelimit"] <= BOUND, held
    assert held["tenant-cache"] <= BOUND and held["entitlements-cache"] <= BOUND, held
    assert held["tenant-subscriber"] == held["entitlements-subscriber"] == 1, held
    assert sum(held.values()) <= 3 * BOUND + 2, held
