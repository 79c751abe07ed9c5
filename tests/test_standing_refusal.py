"""Standing refusals: a tenant the process has boxed is refused again before the rest of the chain.

Each test runs a sites process of its own, for a fresh tenant whose read rate is one call a
minute, so that once its burst is spent its box lasts the whole test. The first refusal comes
from the rate-limit link (through the whole chain: it carries the call's ``x-request-id``);
the ones after it from the standing-refusal link, which answers before the request context
exists (no ``x-request-id``) with the same refusal and counts it the same way.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc

from .support import bearer, free_port, rich_error
from .support.requests import set_limit
from .test_refusal_hold import assert_rate_limited, drain, scrape

LIST = pb.ListSitesRequest(page_size=1)
GET = pb.GetSiteRequest(site_id="NO-SUCH-SITE")


def _trailers(error: Any) -> dict[str, Any]:
    return dict(error.trailing_metadata() or ())


async def _settled(port: int, metric: str, tenant: str) -> float:
    """``metric`` for the tenant once two reads 0.2 s apart agree (at most 5 s)."""
    last = scrape(port, metric, tenant=tenant)
    for _ in range(25):
        await asyncio.sleep(0.2)
        now = scrape(port, metric, tenant=tenant)
        if now == last:
            return now
        last = now
    return last


async def test_a_boxed_tenants_calls_get_the_same_refusal_without_the_chain_and_are_counted(
    extra_sites, features, new_tenant, token, platform_token
):
    tenant = new_tenant(plan="basic")
    set_limit(features, platform_token, tenant, "rpm_read", 1)
    metrics_port = free_port()
    extra = extra_sites({"SITES_METRICS_PORT": str(metrics_port)})
    md = bearer(token(tenant))
    async with grpc.aio.insecure_channel(extra.target) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        _, first, trailers = await drain(stub, md)
        assert_rate_limited(first)
        assert "x-request-id" in dict(trailers), "the first refusal comes through the whole chain"

        # A call is counted just after its status is sent: the drain's last one, a moment later.
        calls_before = await _settled(metrics_port, "towerco_tenant_calls_total", tenant)
        limited_before = scrape(metrics_port, "towerco_tenant_rate_limited_total", tenant=tenant)
        refusals = 20
        for _ in range(refusals):
            try:
                await stub.ListSites(LIST, metadata=md, timeout=10)
            except grpc.aio.AioRpcError as error:
                refusal = assert_rate_limited(rich_error(error))
                trailers = _trailers(error)
            else:
                raise AssertionError("a boxed tenant's call was served")
            # Answered before the request context: the standing-refusal link, not the rate-limit link.
            assert "x-request-id" not in trailers, trailers
            # The same refusal all the same: the wait that remains, in all three places.
            assert refusal.retry is not None
            wait_ms = refusal.retry.retry_delay.ToMilliseconds()
            assert 1 <= wait_ms <= 60_000, wait_ms
            assert trailers["retry-after-ms"] == str(wait_ms)
            assert f"tenant {tenant!r} is over its read rate of 1 calls per minute" in refusal.message
        # Counted as the rate-limit link counts its refusals: by tenant, and in the rate-limited count.
        assert await _settled(metrics_port, "towerco_tenant_calls_total", tenant) - calls_before == refusals
        assert scrape(metrics_port, "towerco_tenant_rate_limited_total", tenant=tenant) - limited_before == refusals


async def test_a_boxed_class_leaves_the_tenants_other_class_and_other_tenants_to_the_chain(
    extra_sites, features, new_tenant, token, platform_token
):
    tenant, other = new_tenant(plan="basic"), new_tenant(plan="basic")
    set_limit(features, platform_token, tenant, "rpm_read", 1)
    extra = extra_sites()
    md = bearer(token(tenant))
    async with grpc.aio.insecure_channel(extra.target) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        await drain(stub, md)
        # Another tenant's read is served (its own NOT_FOUND for a missing site, through the chain).
        try:
            await stub.GetSite(GET, metadata=bearer(token(other)), timeout=10)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND, error
            assert "x-request-id" in _trailers(error)
        # The boxed tenant's write is not boxed: the chain decides it (here: an invalid request).
        try:
            await stub.CreateSite(pb.CreateSiteRequest(site_id="", site=pb.Site()), metadata=md, timeout=10)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
            assert "x-request-id" in _trailers(error)
        else:
            raise AssertionError("an invalid CreateSite was served")
        # A call naming another tenant is a cross-tenant attempt: the whole chain, to be counted
        # and audited as one, boxed tenant or not.
        try:
            await stub.ListSites(LIST, metadata=(*md, ("x-tenant-id", other)), timeout=10)
        except grpc.aio.AioRpcError as error:
            assert "x-request-id" in _trailers(error), "a cross-tenant attempt must take the whole chain"
        else:
            raise AssertionError("a cross-tenant call was served")
        # A token the process has never verified is checked by the chain, boxed tenant or not.
        try:
            await stub.ListSites(LIST, metadata=bearer(token(tenant, nonce="first-sighting")), timeout=10)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert "x-request-id" in _trailers(error), "a first sighting must go through authentication"
        else:
            raise AssertionError("a boxed tenant's call was served")
