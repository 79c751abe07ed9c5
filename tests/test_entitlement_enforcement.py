"""Entitlements enforced where the work happens: sites quotas, plan features, changes seen at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from towerco.features.v1 import feature_gate_service_pb2 as features_pb
from towerco.features.v1 import feature_gate_service_pb2_grpc as features_grpc
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc

from .support import RichError, bearer, expect_error, rich_error
from .support.requests import create_site, set_limit


def analytics(sites: Any, md: Any) -> pb.SiteAnalytics:
    reply: pb.SiteAnalytics = sites.GetSiteAnalytics(pb.GetSiteAnalyticsRequest(), metadata=md, timeout=10)
    return reply


def feature_refused(sites: Any, md: Any) -> RichError:
    error = expect_error(sites.GetSiteAnalytics, pb.GetSiteAnalyticsRequest(), metadata=md)
    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "FEATURE_NOT_IN_PLAN"), error
    return error


# --- max_sites ---------------------------------------------------------------------------


def test_create_site_stops_at_max_sites_with_quota_exceeded(sites, features, new_tenant, token, platform_token):
    tenant = new_tenant(plan="basic")
    md = bearer(token(tenant))
    set_limit(features, platform_token, tenant, "max_sites", 2)
    create_site(sites, md, "Q-1", timeout=20)
    create_site(sites, md, "Q-2", timeout=20)
    error = expect_error(sites.CreateSite, pb.CreateSiteRequest(site_id="Q-3", site=pb.Site(name="x")), metadata=md)
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED"), error
    assert error.info is not None
    assert dict(error.info.metadata) == {"resource": "max_sites", "limit": "2", "usage": "2"}
    assert "(2)" in error.message  # the person reading it learns the limit
    # Nothing half-written: the refused site does not exist, and a freed slot is usable.
    assert expect_error(sites.GetSite, pb.GetSiteRequest(site_id="Q-3"), metadata=md).code == grpc.StatusCode.NOT_FOUND
    sites.DeleteSite(pb.DeleteSiteRequest(site_id="Q-1"), metadata=md, timeout=10)
    assert create_site(sites, md, "Q-3", timeout=20).site_id == "Q-3"


def test_twenty_concurrent_creates_for_the_last_slot_admit_exactly_one(
    sites, features, new_tenant, token, platform_token
):
    tenant = new_tenant(plan="basic")
    md = bearer(token(tenant))
    set_limit(features, platform_token, tenant, "max_sites", 5)
    # 20 at once is more than a basic tenant's calls in flight (fair share): this race is about the quota.
    set_limit(features, platform_token, tenant, "call_concurrency", -1)
    for n in range(4):
        create_site(sites, md, f"R-{n}", timeout=20)

    def attempt(n: int) -> str:
        try:
            create_site(sites, md, f"RACE-{n}", timeout=20)
        except grpc.RpcError as exc:
            error = rich_error(exc)
            return error.reason
        return "CREATED"

    with ThreadPoolExecutor(20) as pool:
        outcomes = list(pool.map(attempt, range(20)))
    assert outcomes.count("CREATED") == 1, outcomes
    assert outcomes.count("QUOTA_EXCEEDED") == 19, outcomes
    listed = sites.ListSites(pb.ListSitesRequest(page_size=100), metadata=md, timeout=10)
    assert len(listed.sites) == 5


def test_an_idempotent_retry_is_answered_even_at_the_limit(sites, features, new_tenant, token, platform_token):
    tenant = new_tenant(plan="basic")
    md = bearer(token(tenant))
    set_limit(features, platform_token, tenant, "max_sites", 1)
    request = pb.CreateSiteRequest(site_id="ONLY", site=pb.Site(name="Only"), request_id="req-only-1")
    first = sites.CreateSite(request, metadata=md, timeout=10)
    assert sites.CreateSite(request, metadata=md, timeout=10) == first


# --- features ------------------------------------------------------------------------------


def test_site_analytics_needs_advanced_analytics(sites, new_tenant, token):
    basic, professional = new_tenant(plan="basic"), new_tenant(plan="professional")
    error = feature_refused(sites, bearer(token(basic)))
    assert error.info is not None
    assert error.info.metadata["feature"] == "advanced_analytics"
    assert error.info.metadata["plan"] == "basic"
    md = bearer(token(professional))
    create_site(sites, md, "A-1", timeout=20)
    assert analytics(sites, md).total_sites == 1


def test_a_plan_change_through_one_process_is_enforced_by_every_sites_process_within_a_second(
    sites, extra_service, extra_sites, new_tenant, token, platform_token, eventually
):
    tenant = new_tenant(plan="professional")
    md = bearer(token(tenant))
    other = new_tenant(plan="professional")
    other_md = bearer(token(other))
    second_features = extra_service("features")
    with (
        grpc.insecure_channel(extra_sites().target) as sites_channel,
        grpc.insecure_channel(second_features.target) as gate_channel,
    ):
        second_sites = sites_grpc.SiteServiceStub(sites_channel)
        gate = features_grpc.FeatureGateServiceStub(gate_channel)
        for stub in (sites, second_sites):  # both hold the professional entitlements in memory
            assert analytics(stub, md).total_sites == 0

        gate.SetTenantPlan(
            features_pb.SetTenantPlanRequest(tenant_id=tenant, plan="basic"),
            metadata=bearer(platform_token),
            timeout=10,
        )
        eventually(lambda: [feature_refused(stub, md) for stub in (sites, second_sites)])
        # The other tenant keeps its plan.
        assert analytics(sites, other_md).total_sites == analytics(second_sites, other_md).total_sites == 0

        gate.SetFeatureOverride(
            features_pb.SetFeatureOverrideRequest(tenant_id=tenant, feature="advanced_analytics", enabled=True),
            metadata=bearer(platform_token),
            timeout=10,
        )
        eventually(lambda: [analytics(stub, md) for stub in (sites, second_sites)])

        gate.SetLimitOverride(
            features_pb.SetLimitOverrideRequest(tenant_id=tenant, resource="max_sites", limit=0),
            metadata=bearer(platform_token),
            timeout=10,
        )

        def quota_refused() -> None:
            for n, stub in enumerate((sites, second_sites)):
                request = pb.CreateSiteRequest(site_id=f"P-{n}", site=pb.Site(name="x"))
                error = expect_error(stub.CreateSite, request, metadata=md)
                assert error.reason == "QUOTA_EXCEEDED", error

        eventually(quota_refused)
