"""The request context travels: onto outgoing calls (channels.py) and back in trailers.

A service calling another through :func:`service_channel` must act for the same tenant
and caller as the request it is serving, whatever metadata its own code passes, and the
request id must come back to the caller on successes and failures alike.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as pb_grpc

from services.runtime import context
from services.runtime.auth import TokenVerifier, VerifierConfig
from services.runtime.channels import propagation_metadata, service_channel
from services.runtime.context import Caller, RequestContext
from services.runtime.entitlements import CHANNEL as ENTITLEMENTS_CHANNEL
from services.runtime.entitlements import EntitlementDirectory, FeatureGateSource
from services.runtime.identity import ServiceIdentity
from services.runtime.interceptors.chain import server_chain
from services.runtime.plans import load_plans
from services.runtime.policy import PolicyTable
from services.runtime.ratelimit import LimiterConfig, RateLimiter
from services.runtime.redis_clients import RedisConfig
from services.runtime.roles import ROLE_PERMISSIONS
from services.runtime.settings import (
    DEFAULT_JWT_AUDIENCE,
    DEFAULT_JWT_ISSUER,
    DEFAULT_SERVICE_JWT_ISSUER,
    DEV_SERVICE_KEY_ID,
)
from services.runtime.tenant_cache import TenantCache
from services.runtime.tenants import RegistryStateSource, TenantDirectory

from .support import bearer, expect_error, rich_error
from .support.servicers import SitesServing

DOMAIN = "towerco.sites.v1.SiteService"


def request_context(tenant: str, token: str, request_id: str = "rid-1") -> RequestContext:
    caller = Caller(
        subject=f"dev-admin@{tenant}",
        tenant_id=tenant,
        role="admin",
        permissions=frozenset(ROLE_PERMISSIONS["admin"]),
        token=token,
    )
    return RequestContext(request_id=request_id, method="x", caller=caller, tenant_id=tenant)


def site_ids(sites: Any, token: str) -> list[str]:
    listed = sites.ListSites(pb.ListSitesRequest(), metadata=bearer(token), timeout=10)
    return [s.site_id for s in listed.sites]


# --- propagation_metadata, no server -------------------------------------------------------


def test_outside_any_context_nothing_is_added():
    assert context.current() is None
    assert propagation_metadata(None) == []
    assert propagation_metadata([("x-trace", "t1")]) == [("x-trace", "t1")]


def test_outside_any_context_identity_headers_are_still_dropped():
    # service_channel never forwards an identity the request context did not vouch for.
    supplied = [("authorization", "Bearer forged"), ("X-Tenant-Id", "tb_x"), ("x-request-id", "r"), ("k", "v")]
    assert propagation_metadata(supplied) == [("k", "v")]


def test_inside_a_context_its_identity_replaces_the_supplied_one():
    ctx = request_context("ta_unit", "token-of-a", request_id="rid-unit")
    supplied = [("Authorization", "Bearer forged"), ("x-tenant-id", "tb_unit"), ("x-request-id", "r"), ("k", "v")]
    with context.bind(ctx):
        result = propagation_metadata(supplied)
    assert sorted(result) == sorted(
        [("k", "v"), ("x-request-id", "rid-unit"), ("x-tenant-id", "ta_unit"), ("authorization", "Bearer token-of-a")]
    )
    assert context.current() is None  # bind() restored the empty context


# --- service_channel against the running sites service -----------------------------------------


async def test_service_channel_acts_for_the_context_tenant(sites, sites_target, token, tenant_pair):
    tenant_x, tenant_y = tenant_pair
    token_x, token_y = token(tenant_x), token(tenant_y)
    async with service_channel(sites_target) as channel:
        stub = pb_grpc.SiteServiceStub(channel)
        with context.bind(request_context(tenant_x, token_x)):
            create = stub.CreateSite(
                pb.CreateSiteRequest(site_id="PROP-1", site=pb.Site(name="Propagated")), timeout=10
            )
            created = await create
            trailing = await create.trailing_metadata()
            got = await stub.GetSite(pb.GetSiteRequest(site_id="PROP-1"), timeout=10)

    assert created.tenant_id == tenant_x
    assert got.tenant_id == tenant_x and got.name == "Propagated"
    assert trailing.get_all("x-request-id") == ["rid-1"]
    # Seen from outside: the site is X's, and does not exist for Y.
    assert sites.GetSite(pb.GetSiteRequest(site_id="PROP-1"), metadata=bearer(token_x), timeout=10).name == "Propagated"
    error = expect_error(sites.GetSite, pb.GetSiteRequest(site_id="PROP-1"), metadata=bearer(token_y))
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert site_ids(sites, token_y) == []


async def test_service_channel_overrides_caller_supplied_identity(sites, sites_target, token, tenant_pair):
    tenant_x, tenant_y = tenant_pair
    token_x, token_y = token(tenant_x), token(tenant_y)
    forged = [("authorization", f"Bearer {token_y}"), ("x-tenant-id", tenant_y), ("x-request-id", "rid-forged")]
    async with service_channel(sites_target) as channel:
        stub = pb_grpc.SiteServiceStub(channel)
        with context.bind(request_context(tenant_x, token_x)):
            create = stub.CreateSite(
                pb.CreateSiteRequest(site_id="PROP-2", site=pb.Site(name="Not Y's")), metadata=forged, timeout=10
            )
            created = await create
            trailing = await create.trailing_metadata()

    assert created.tenant_id == tenant_x
    assert trailing.get_all("x-request-id") == ["rid-1"]
    assert site_ids(sites, token_x) == ["PROP-2"]
    assert site_ids(sites, token_y) == []


async def test_service_channel_outside_a_request_carries_no_identity(sites_target, token, tenant_pair):
    tenant_x, _ = tenant_pair
    async with service_channel(sites_target) as channel:
        stub = pb_grpc.SiteServiceStub(channel)
        with pytest.raises(aio.AioRpcError) as failure:
            await stub.ListSites(pb.ListSitesRequest(), metadata=bearer(token(tenant_x)), timeout=10)
    error = rich_error(failure.value)
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.reason == "TOKEN_MISSING"


# --- the request id comes back on failures too ------------------------------------------------


def _trailing_request_ids(error: grpc.RpcError) -> list[str]:
    call: Any = error
    return [value for key, value in call.trailing_metadata() or () if key == "x-request-id"]


@pytest.mark.parametrize(
    ("case", "code"),
    [("no-token", grpc.StatusCode.UNAUTHENTICATED), ("cross-tenant", grpc.StatusCode.PERMISSION_DENIED)],
)
def test_refused_call_returns_the_request_id(sites, token, tenant_pair, case, code):
    tenant_a, tenant_b = tenant_pair
    metadata = [("x-request-id", f"rid-{case}")]
    if case == "cross-tenant":
        metadata += bearer(token(tenant_a), tenant_b)
    with pytest.raises(grpc.RpcError) as failure:
        sites.ListSites(pb.ListSitesRequest(), metadata=metadata, timeout=10)
    assert failure.value.code() == code
    assert rich_error(failure.value).info is not None  # the rich details are still there
    assert _trailing_request_ids(failure.value) == [f"rid-{case}"]


class _BrokenSites(SitesServing):
    async def GetSite(self, request: pb.GetSiteRequest, ctx: Any) -> pb.Site:
        raise RuntimeError("secret internals")


@pytest.fixture
async def broken_server(stack: Any) -> AsyncIterator[str]:
    """The real interceptor chain in front of a SiteService whose GetSite crashes."""
    policies = PolicyTable.from_services([pb.DESCRIPTOR.services_by_name["SiteService"]])
    verifier = TokenVerifier(
        VerifierConfig(DEFAULT_JWT_ISSUER, DEFAULT_JWT_AUDIENCE, jwks_file=str(stack.keys_dir / "jwks.json"))
    )
    # Tenant state from the real registry, through a real Redis-backed cache.
    redis = RedisConfig(stack.redis_url, timeout_seconds=0.5)
    cache = TenantCache(redis, local_seconds=5)
    identity = ServiceIdentity.from_file(
        "sites",
        issuer=DEFAULT_SERVICE_JWT_ISSUER,
        audience=DEFAULT_JWT_AUDIENCE,
        key_file=str(stack.keys_dir / "service-signing-key.pem"),
        kid=DEV_SERVICE_KEY_ID,
    )
    source = RegistryStateSource(f"127.0.0.1:{stack.config.ports['tenant']}", identity)
    tenants = TenantDirectory(cache, source)
    gate = FeatureGateSource(f"127.0.0.1:{stack.config.ports['features']}", identity)
    gate_cache = TenantCache(redis, local_seconds=5, channel=ENTITLEMENTS_CHANNEL)
    directory = EntitlementDirectory(gate_cache, gate, load_plans(), tenants)
    limiter = RateLimiter(redis, LimiterConfig())
    server = aio.server(interceptors=server_chain(policies, verifier, tenants, directory, limiter))
    pb_grpc.add_SiteServiceServicer_to_server(_BrokenSites(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
        await source.close()
        await cache.close()
        await gate.close()
        await gate_cache.close()
        await limiter.close()


async def test_internal_error_quotes_the_request_id(broken_server, token, tenant_pair):
    tenant, _ = tenant_pair
    async with aio.insecure_channel(broken_server) as channel:
        stub = pb_grpc.SiteServiceStub(channel)
        metadata = bearer(token(tenant), **{"x-request-id": "rid-boom"})
        with pytest.raises(aio.AioRpcError) as failure:
            await stub.GetSite(pb.GetSiteRequest(site_id="S-1"), metadata=metadata, timeout=10)
    error = rich_error(failure.value)
    assert error.code == grpc.StatusCode.INTERNAL
    assert error.info is not None
    assert error.reason == "INTERNAL_ERROR" and error.info.domain == DOMAIN
    assert "secret internals" not in error.message  # internals stay in the log
    assert "quote request id rid-boom " in error.message
    assert dict(error.info.metadata) == {"request_id": "rid-boom"}
    assert _trailing_request_ids(failure.value) == ["rid-boom"]
