"""Cached tenant configuration across processes: changes seen everywhere at once, Redis optional.

Each process keeps tenants in memory for ``TENANT_CACHE_SECONDS`` (5 s by default), so a
second registry process that already read a tenant would serve its old copy for seconds
unless the change notice reaches it: seeing the change within 1 second proves the push.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
import redis
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as pb
from towerco.tenant.v1 import tenant_registry_service_pb2_grpc as pb_grpc

from .support import bearer
from .support.metadata import Metadata


def company_name(stub: Any, md: Metadata) -> str:
    name: str = stub.GetTenantSettings(pb.GetTenantSettingsRequest(), metadata=md, timeout=10).branding.company_name
    return name


def rename(stub: Any, md: Metadata, name: str) -> pb.TenantSettings:
    request = pb.UpdateTenantSettingsRequest(settings=pb.TenantSettings(branding=pb.Branding(company_name=name)))
    request.update_mask.paths.append("branding.company_name")
    settings: pb.TenantSettings = stub.UpdateTenantSettings(request, metadata=md, timeout=10)
    return settings


def test_a_settings_update_through_one_registry_process_is_seen_by_another_within_a_second(
    registry, extra_service, token, tenant_pair, eventually
):
    tenant, _ = tenant_pair
    md = bearer(token(tenant))
    with grpc.insecure_channel(extra_service("tenant").target) as channel:
        second = pb_grpc.TenantRegistryServiceStub(channel)
        # Both processes hold the current settings in memory.
        assert company_name(registry, md) == company_name(second, md) == tenant

        assert rename(second, md, "Renamed via second").branding.company_name == "Renamed via second"

        def seen_by_first() -> None:
            assert company_name(registry, md) == "Renamed via second"
            # Public reads share the cache: a sign-in page shows the new name as soon.
            branding = registry.GetBranding(pb.GetBrandingRequest(tenant_id=tenant), timeout=10)
            assert branding.company_name == "Renamed via second"

        eventually(seen_by_first)

        # And the other way round.
        rename(registry, md, "Renamed via first")
        eventually(lambda: assert_name(second, md, "Renamed via first"))


def assert_name(stub: Any, md: Metadata, expected: str) -> None:
    assert company_name(stub, md) == expected


def test_a_suspension_through_one_registry_process_reaches_another_within_a_second(
    registry, extra_service, token, platform_token, tenant_pair, eventually
):
    tenant, _ = tenant_pair
    md = bearer(token(tenant))
    with grpc.insecure_channel(extra_service("tenant").target) as channel:
        second = pb_grpc.TenantRegistryServiceStub(channel)
        assert company_name(second, md) == tenant  # the second process holds the tenant as ACTIVE
        registry.SuspendTenant(
            pb.SuspendTenantRequest(tenant_id=tenant, reason="cache test"), metadata=bearer(platform_token), timeout=10
        )

        def refused_by_second() -> None:
            try:
                company_name(second, md)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
                return
            raise AssertionError("the second registry process still serves the suspended tenant")

        eventually(refused_by_second)


def test_with_redis_stopped_mid_test_reads_and_writes_still_succeed(extra_service, private_redis, token, tenant_pair):
    tenant, _ = tenant_pair
    md = bearer(token(tenant))
    # No memory to lean on: every read goes to Redis or, without it, to the source.
    env = {"REDIS_URL": private_redis.url, "TENANT_CACHE_SECONDS": "0"}
    tenant_process = extra_service("tenant", env)
    sites_process = extra_service("sites", {**env, "TENANT_TARGET": tenant_process.target})
    with (
        grpc.insecure_channel(tenant_process.target) as tenant_channel,
        grpc.insecure_channel(sites_process.target) as sites_channel,
    ):
        registry = pb_grpc.TenantRegistryServiceStub(tenant_channel)
        sites = sites_grpc.SiteServiceStub(sites_channel)
        assert rename(registry, md, "Before the outage").branding.company_name == "Before the outage"
        assert company_name(registry, md) == "Before the outage"
        site = sites_pb.CreateSiteRequest(site_id="REDIS-1", site=sites_pb.Site(name="before"))
        sites.CreateSite(site, metadata=md, timeout=10)

        # The premise: these processes use the private Redis (the rename was cached there).
        client = redis.Redis.from_url(private_redis.url, socket_timeout=2)
        try:
            assert client.exists(f"tenant:{{{tenant}}}:settings") == 1
            private_redis.stop()
            with pytest.raises(redis.ConnectionError):
                client.ping()
        finally:
            client.close()

        assert company_name(registry, md) == "Before the outage"
        assert rename(registry, md, "During the outage").branding.company_name == "During the outage"
        assert company_name(registry, md) == "During the outage"
        branding = registry.GetBranding(pb.GetBrandingRequest(tenant_id=tenant), timeout=10)
        assert branding.company_name == "During the outage"
        listed = sites.ListSites(sites_pb.ListSitesRequest(), metadata=md, timeout=10)
        assert [s.site_id for s in listed.sites] == ["REDIS-1"]
        sites.CreateSite(
            sites_pb.CreateSiteRequest(site_id="REDIS-2", site=sites_pb.Site(name="during")), metadata=md, timeout=10
        )
        got = sites.GetSite(sites_pb.GetSiteRequest(site_id="REDIS-2"), metadata=md, timeout=10)
        assert got.name == "during"
    assert tenant_process.process.poll() is None and sites_process.process.poll() is None
