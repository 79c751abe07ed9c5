"""Fair share inside a process: a tenant's calls in flight are bounded by its call_concurrency.

Slow calls are GetSiteAnalytics held by an armed pause (``FAULT_POINTS=sites.analytics@N``)
in a sites process of the test's own; the other tests use the session's stack, with an
override of 0 (every call refused) to see the bound without slow calls.
"""

from __future__ import annotations

import asyncio
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
from google.protobuf import timestamp_pb2
from prometheus_client.parser import text_string_to_metric_families
from towerco.features.v1 import feature_gate_service_pb2 as features_pb
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb

from services.runtime.interceptors.call_concurrency import LIMIT
from services.runtime.plans import load_plans

from .support import RichError, bearer, expect_error, free_port, rich_error
from .support.processes import ExtraService
from .support.requests import set_limit

SITES_DOMAIN = "towerco.sites.v1.SiteService"
LIST = pb.ListSitesRequest(page_size=1)
HELD = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state = 'idle in transaction'"


def test_call_concurrency_is_8_16_32_by_plan_and_8_by_default() -> None:
    plans = load_plans()
    assert [plan.limits[LIMIT] for plan in plans.ordered] == [8, 16, 32]
    assert plans.default_limits[LIMIT] == 8


def assert_calls_limit(error: RichError, max_in_flight: int) -> None:
    """The refusal's full shape (rich_error has already held it to the catalogue)."""
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TENANT_CALLS_LIMIT"), error
    assert error.info is not None and error.info.domain == SITES_DOMAIN, error
    assert dict(error.info.metadata) == {"limit": LIMIT, "max_in_flight": str(max_in_flight)}, error
    assert error.retry is not None and error.retry.retry_delay.ToNanoseconds() > 0, error
    assert LIMIT in error.message, error


def usage_now(tenant: str) -> features_pb.GetUsageRequest:
    """GetUsage of ``tenant`` over the hours around now (in case the calls straddle an hour)."""
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start, end = timestamp_pb2.Timestamp(), timestamp_pb2.Timestamp()
    start.FromDatetime(now - timedelta(hours=1))
    end.FromDatetime(now + timedelta(hours=2))
    return features_pb.GetUsageRequest(tenant_id=tenant, start_time=start, end_time=end)


def scrape(port: int, metric: str, tenant: str) -> float:
    """The value of ``metric``'s sample for ``tenant`` in the process's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metric and sample.labels.get("tenant") == tenant:
                return float(sample.value)
    return 0.0


async def holding(admin_dsn: str, extra: ExtraService, count: int) -> None:
    """Wait until ``count`` of the process's calls are paused in their transaction (at most 20 s):
    past the call-concurrency link, each holds its slot. The process names its connections
    ``towerco-sites/<pid>``; nothing else of it is in a transaction during the test."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        async with asyncio.timeout(20):
            while True:
                found = await conn.fetchval(HELD, f"towerco-sites/{extra.process.pid}")
                if found == count:
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"never saw {count} calls of the process held in a transaction") from None
    finally:
        await conn.close()


async def served_again(stub: Any, md: Any) -> None:
    """Call ListSites until it is served (at most 20 s): the tenant has a free slot again."""
    try:
        async with asyncio.timeout(20):
            while True:
                try:
                    await stub.ListSites(LIST, metadata=md, timeout=10)
                    return
                except grpc.aio.AioRpcError as error:
                    assert rich_error(error).reason == "TENANT_CALLS_LIMIT", error
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError("the tenant's slot was never freed") from None


async def refused(call: Any) -> RichError:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return rich_error(error)
    raise AssertionError("the call was served, a refusal was expected")


async def test_a_tenant_over_its_calls_in_flight_is_refused_while_another_is_served(
    extra_sites, admin_dsn, features, new_tenant, token, platform_token, eventually
):
    busy, calm = new_tenant(plan="professional"), new_tenant(plan="professional")
    set_limit(features, platform_token, busy, LIMIT, 2)
    metrics_port = free_port()
    # Each GetSiteAnalytics takes 5 s: long enough to hold its slot through the checks below.
    extra = extra_sites(
        {"FAULT_POINTS": "sites.analytics@5", "SITES_METRICS_PORT": str(metrics_port), "USAGE_FLUSH_SECONDS": "0.5"}
    )
    busy_md, calm_md = bearer(token(busy)), bearer(token(calm))

    async with grpc.aio.insecure_channel(extra.target) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        slow = [
            asyncio.ensure_future(stub.GetSiteAnalytics(pb.GetSiteAnalyticsRequest(), metadata=busy_md, timeout=30))
            for _ in range(2)
        ]
        await holding(admin_dsn, extra, 2)

        # A third call, however cheap, is refused at once.
        assert_calls_limit(await refused(stub.ListSites(LIST, metadata=busy_md, timeout=10)), 2)

        # The calm tenant is served meanwhile, more calls at once than the busy one may have.
        await asyncio.gather(*(stub.ListSites(LIST, metadata=calm_md, timeout=10) for _ in range(4)))
        await stub.CreateSite(pb.CreateSiteRequest(site_id="CALM-1", site=pb.Site(name="c")), metadata=calm_md)
        assert not any(task.done() for task in slow), "the busy tenant's calls ended before the checks"

        # Once its calls end, the busy tenant is served again (a slot is freed before the answer leaves).
        assert [reply.total_sites for reply in await asyncio.gather(*slow)] == [0, 0]
        await stub.ListSites(LIST, metadata=busy_md, timeout=10)

    assert scrape(metrics_port, "towerco_tenant_calls_limited_total", busy) == 1
    assert scrape(metrics_port, "towerco_tenant_calls_limited_total", calm) == 0

    def counted_in_usage() -> None:
        usage = features.GetUsage(usage_now(busy), metadata=bearer(platform_token), timeout=10)
        assert usage.totals.calls_limited == 1, usage.totals

    eventually(counted_in_usage, within=10)


async def test_a_slot_is_freed_when_the_client_gives_up(
    extra_sites, admin_dsn, features, new_tenant, token, platform_token
):
    tenant = new_tenant(plan="professional")
    set_limit(features, platform_token, tenant, LIMIT, 1)
    # A minute's pause: within the test, only the client's deadline or cancellation ends a call.
    extra = extra_sites({"FAULT_POINTS": "sites.analytics@60"})
    md = bearer(token(tenant))

    async with grpc.aio.insecure_channel(extra.target) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        expired = stub.GetSiteAnalytics(pb.GetSiteAnalyticsRequest(), metadata=md, timeout=4)
        await holding(admin_dsn, extra, 1)  # in flight, then past its deadline
        assert (await refused(expired)).code == grpc.StatusCode.DEADLINE_EXCEEDED
        await served_again(stub, md)

        cancelled = stub.GetSiteAnalytics(pb.GetSiteAnalyticsRequest(), metadata=md, timeout=120)
        await holding(admin_dsn, extra, 1)
        assert_calls_limit(await refused(stub.ListSites(LIST, metadata=md, timeout=10)), 1)
        cancelled.cancel()
        await served_again(stub, md)


def test_a_slot_is_freed_when_the_call_fails(sites, features, new_tenant, token, platform_token, eventually):
    tenant = new_tenant(plan="basic")
    md = bearer(token(tenant))
    set_limit(features, platform_token, tenant, LIMIT, 0)
    eventually(lambda: assert_calls_limit(expect_error(sites.ListSites, LIST, metadata=md), 0), within=5)
    set_limit(features, platform_token, tenant, LIMIT, 1)
    eventually(lambda: sites.ListSites(LIST, metadata=md, timeout=10), within=5)

    # One call at a time fits a bound of 1 only if each failed call gave its slot back.
    for _ in range(3):
        missing = expect_error(sites.GetSite, pb.GetSiteRequest(site_id="NO-SUCH-SITE"), metadata=md)
        assert missing.reason == "SITE_NOT_FOUND", missing
        bad_name = pb.CreateSiteRequest(site_id="NUL-1", site=pb.Site(name="a\x00b"))
        refused_later = expect_error(sites.CreateSite, bad_name, metadata=md)  # by a link inside this one
        assert refused_later.code == grpc.StatusCode.INVALID_ARGUMENT, refused_later
    sites.ListSites(LIST, metadata=md, timeout=10)


def test_the_bound_is_the_tenants_own_and_an_override_raise_takes_effect(
    sites, registry, features, new_tenant, token, platform_token, eventually
):
    tenant, other = new_tenant(plan="enterprise"), new_tenant(plan="basic")
    md, admin = bearer(token(tenant)), bearer(platform_token)
    set_limit(features, platform_token, tenant, LIMIT, 0)
    eventually(lambda: assert_calls_limit(expect_error(sites.ListSites, LIST, metadata=md), 0), within=5)
    settings = expect_error(registry.GetTenantSettings, tenant_pb.GetTenantSettingsRequest(), metadata=md)
    assert settings.reason == "TENANT_CALLS_LIMIT", settings  # in every service

    sites.ListSites(LIST, metadata=bearer(token(other)), timeout=10)
    # Public calls, platform admins acting on the tenant, and the platform services the
    # feature gate asks for what the tenant holds are not held to the tenant's plan.
    registry.GetBranding(tenant_pb.GetBrandingRequest(tenant_id=tenant), metadata=md, timeout=10)
    registry.GetTenant(tenant_pb.GetTenantRequest(tenant_id=tenant), metadata=admin, timeout=10)
    usage = features.GetUsage(usage_now(tenant), metadata=admin, timeout=10)
    limits = {item.resource: item for item in usage.limits}
    assert (limits[LIMIT].limit, limits["max_sites"].used) == (0, 0)

    set_limit(features, platform_token, tenant, LIMIT, 2)
    eventually(lambda: sites.ListSites(LIST, metadata=md, timeout=10), within=5)
