"""What usage metering costs a call: all its counting work, in the process, per call.

The usage link wraps a handler that does nothing but the counting a tenant's database
transaction adds (``db_microseconds``), so the difference to calling that handler bare is
the link's whole cost: finding the tenant user's call, the hour, and the counters of a
gated RPC (calls and feature). Spread over 10,000 tenants, as a busy process's dict is.
The floor is one dict increment per call.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from towerco.sites.v1 import sites_service_pb2

from services.runtime import context, usage
from services.runtime.context import Caller, RequestContext
from services.runtime.interceptors.base import Metadata
from services.runtime.interceptors.usage import UsageInterceptor
from services.runtime.policy import PolicyTable

CALLS = 50_000
TENANTS = [f"bench_{i:05d}" for i in range(10_000)]
TARGET_US = 10.0


async def _handler(request: Any, ctx: Any) -> Any:
    usage.active().db_time(request, 0.000_250)  # one transaction of the tenant's
    return request


async def _bare(request: Any, ctx: Any) -> Any:
    return request


def _as_user_of(tenant_id: str) -> RequestContext:
    caller = Caller(subject="bench", tenant_id=tenant_id, role="admin", permissions=frozenset(), token="")
    return RequestContext(request_id="bench", method="bench", caller=caller, tenant_id=tenant_id)


async def _per_call_us(behavior: Any, contexts: list[RequestContext]) -> float:
    total = 0.0
    for ctx in contexts:
        with context.bind(ctx):
            start = time.perf_counter()
            for _ in range(CALLS // len(contexts)):
                await behavior(ctx.tenant_id, None)
            total += time.perf_counter() - start
    return total / (CALLS // len(contexts) * len(contexts)) * 1e6


async def _measure() -> tuple[float, float]:
    policies = PolicyTable.from_services([sites_service_pb2.DESCRIPTOR.services_by_name["SiteService"]])
    policy = policies.get("/towerco.sites.v1.SiteService/GetSiteAnalytics")  # a gated read
    assert policy is not None and policy.feature
    wrapped = UsageInterceptor(policies).wrap(_handler, policy, Metadata([]))
    contexts = [_as_user_of(t) for t in TENANTS[:: len(TENANTS) // 50]]
    bare = await _per_call_us(_bare, contexts)
    for tenant_id in TENANTS:  # every tenant in the dict already, as after a busy interval
        usage.active().count(tenant_id, usage.READ_CALLS)
    counted = await _per_call_us(wrapped, contexts) - bare
    counts: dict[tuple[str, int, str], int] = {}
    start = time.perf_counter()
    for i in range(CALLS):
        key = (TENANTS[i % len(TENANTS)], 0, usage.READ_CALLS)
        counts[key] = counts.get(key, 0) + 1
    floor = (time.perf_counter() - start) / CALLS * 1e6
    return counted, floor


def bench_usage() -> tuple[float, float]:
    """The counting cost per call and its floor, in microseconds."""
    counted, floor = asyncio.run(_measure())
    usage.active().cut()  # the bench's counts go nowhere
    usage.active().pending.clear()
    return counted, floor


if __name__ == "__main__":
    counted, floor = bench_usage()
    print(f"usage per call {counted:7.2f} us, floor (one dict increment) {floor:5.2f} us, target < {TARGET_US:g} us")
