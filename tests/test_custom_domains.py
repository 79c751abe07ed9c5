"""AddCustomDomain, RemoveCustomDomain and ListCustomDomains on the real registry.

Platform admins add and remove a tenant's domains; a domain belongs to one tenant
platform-wide; each change is audited once and seen by ResolveTenant and GetBranding at
once; the gateway's sync reads the whole map with a service token (ListCustomDomains).
What the registry wrote is checked in PostgreSQL as the superuser.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import grpc
import pytest
from towerco.internal.v1 import tenant_data_pb2 as internal_pb
from towerco.internal.v1 import tenant_data_pb2_grpc as internal_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as pb

from services.runtime.canary import CANARY_TENANTS
from services.tenant.hosts import MAX_DOMAINS

from .support import bearer, expect_error
from .support.requests import get_tenant
from .test_audit_service import settle, stored

pytestmark = pytest.mark.stack


def fresh_domain(label: str = "aiops") -> str:
    return f"{label}.{uuid.uuid4().hex[:10]}.operator.example"


def add(registry: Any, token: str, tenant_id: str, domain: str) -> pb.Tenant:
    request = pb.AddCustomDomainRequest(tenant_id=tenant_id, domain=domain)
    reply: pb.Tenant = registry.AddCustomDomain(request, metadata=bearer(token), timeout=10)
    return reply


def remove(registry: Any, token: str, tenant_id: str, domain: str) -> pb.Tenant:
    request = pb.RemoveCustomDomainRequest(tenant_id=tenant_id, domain=domain)
    reply: pb.Tenant = registry.RemoveCustomDomain(request, metadata=bearer(token), timeout=10)
    return reply


def resolves_to(registry: Any, host: str) -> str | None:
    try:
        return str(registry.ResolveTenant(pb.ResolveTenantRequest(host=host), timeout=10).tenant_id)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND, error
        return None


async def domain_events(admin: asyncpg.Connection[Any], tenant: str) -> list[tuple[str, str]]:
    await settle(admin, tenant)
    return [(e["action"], str(e["details"])) for e in await stored(admin, tenant) if e["action"].endswith("_domain")]


@pytest.fixture
def directory(tenant_target: str) -> Iterator[internal_grpc.TenantDirectoryServiceStub]:
    with grpc.insecure_channel(tenant_target) as channel:
        yield internal_grpc.TenantDirectoryServiceStub(channel)


def listed(directory: Any, token: str, page_size: int = 0) -> dict[str, str]:
    """Every domain ListCustomDomains names, page after page."""
    found: dict[str, str] = {}
    token_ = ""
    while True:
        reply = directory.ListCustomDomains(
            internal_pb.ListCustomDomainsRequest(page_size=page_size, page_token=token_),
            metadata=bearer(token),
            timeout=10,
        )
        assert reply.domains or not reply.next_page_token
        for item in reply.domains:
            assert item.domain not in found, "each domain on one page only"
            found[item.domain] = item.tenant_id
        token_ = reply.next_page_token
        if not token_:
            return found


async def test_an_added_domain_resolves_at_once_and_a_removed_one_stops_each_audited_once(
    registry, platform_token, new_tenant, admin
):
    tenant = new_tenant("cd")
    domain = fresh_domain()
    assert resolves_to(registry, domain) is None

    added = add(registry, platform_token, tenant, domain)
    assert list(added.domains) == [domain]
    assert resolves_to(registry, domain) == tenant
    assert resolves_to(registry, f"{domain.upper()}:443") == tenant
    branding = registry.GetBranding(pb.GetBrandingRequest(host=domain), timeout=10)
    assert branding.display_name, "the sign-in page of the domain is the tenant's"
    assert list(get_tenant(registry, platform_token, tenant).domains) == [domain]
    rows = await admin.fetch("SELECT tenant_id FROM tenant.host_routes WHERE host = $1", domain)
    assert [r["tenant_id"] for r in rows] == [tenant]

    # The same domain again: nothing changes, nothing more is recorded.
    version = await admin.fetchval("SELECT version FROM tenant.tenants WHERE tenant_id = $1", tenant)
    assert list(add(registry, platform_token, tenant, domain).domains) == [domain]
    assert await admin.fetchval("SELECT version FROM tenant.tenants WHERE tenant_id = $1", tenant) == version

    removed = remove(registry, platform_token, tenant, domain)
    assert list(removed.domains) == []
    assert resolves_to(registry, domain) is None
    error = expect_error(registry.GetBranding, pb.GetBrandingRequest(host=domain))
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "HOST_NOT_FOUND"), error
    # Removing what the tenant lacks succeeds and changes nothing.
    assert list(remove(registry, platform_token, tenant, domain).domains) == []

    events = await domain_events(admin, tenant)
    assert [action for action, _ in events] == ["tenants.add_domain", "tenants.remove_domain"], events
    assert all(domain in details for _, details in events)


def test_another_tenants_domain_is_already_exists_and_stays_its_own(registry, platform_token, new_tenant):
    domain = fresh_domain()
    owner = new_tenant("cdo", domains=[domain])
    other = new_tenant("cdx")
    error = expect_error(
        registry.AddCustomDomain,
        pb.AddCustomDomainRequest(tenant_id=other, domain=domain),
        metadata=bearer(platform_token),
    )
    assert (error.code, error.reason) == (grpc.StatusCode.ALREADY_EXISTS, "DOMAIN_ALREADY_EXISTS"), error
    assert error.info is not None and dict(error.info.metadata) == {"resource": "domain", "name": domain}
    assert owner not in error.message, "the refusal does not say whose the domain is"
    # Removing it from the tenant that lacks it leaves the owner's route alone.
    assert list(remove(registry, platform_token, other, domain).domains) == []
    assert resolves_to(registry, domain) == owner
    assert list(get_tenant(registry, platform_token, other).domains) == []


@pytest.mark.parametrize("method", ["AddCustomDomain", "RemoveCustomDomain"])
def test_a_domain_of_a_tenant_that_does_not_exist_is_not_found(registry, platform_token, method):
    request_type = pb.AddCustomDomainRequest if method == "AddCustomDomain" else pb.RemoveCustomDomainRequest
    request = request_type(tenant_id=f"none_{uuid.uuid4().hex[:10]}", domain=fresh_domain())
    error = expect_error(getattr(registry, method), request, metadata=bearer(platform_token))
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "TENANT_NOT_FOUND"), error


@pytest.mark.parametrize(
    ("tenant_id", "domain", "field"),
    [
        ("{t}", "", "domain"),
        ("{t}", "Aiops.Operator.example", "domain"),
        ("{t}", "localhost-only", "domain"),
        ("{t}", "noc.{t}.localhost", "domain"),
        ("{t}", "evil.localhost", "domain"),
        ("{t}", "10.0.0.1", "domain"),
        ("{t}", "bad host.example", "domain"),
        ("{t}", "under_score.example", "domain"),
        ("", "aiops.operator.example", "tenant_id"),
        ("Bad Id", "aiops.operator.example", "tenant_id"),
        ("platform", "aiops.operator.example", "tenant_id"),
    ],
    ids=[
        "empty",
        "upper-case",
        "one-label",
        "platform-subdomain",
        "platform-domain",
        "ip",
        "space",
        "underscore",
        "no-tenant",
        "bad-tenant",
        "platform-tenant",
    ],
)
def test_a_bad_domain_or_tenant_is_invalid_argument_naming_the_field(
    registry, platform_token, new_tenant, admin, tenant_id, domain, field
):
    tenant = new_tenant("cdv")
    request = pb.AddCustomDomainRequest(tenant_id=tenant_id.format(t=tenant), domain=domain.format(t=tenant))
    error = expect_error(registry.AddCustomDomain, request, metadata=bearer(platform_token))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.fields == [field], error
    assert list(get_tenant(registry, platform_token, tenant).domains) == []


def test_a_tenant_has_at_most_max_domains(registry, platform_token, new_tenant):
    domains = sorted(fresh_domain(f"d{n}") for n in range(MAX_DOMAINS))
    tenant = new_tenant("cdm", domains=domains)
    one_more = fresh_domain("extra")
    error = expect_error(
        registry.AddCustomDomain,
        pb.AddCustomDomainRequest(tenant_id=tenant, domain=one_more),
        metadata=bearer(platform_token),
    )
    assert (error.code, error.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["domain"]), error
    assert str(MAX_DOMAINS) in error.bad_request.field_violations[0].description  # type: ignore[union-attr]
    # One already there is still no change; after a removal there is room again.
    assert list(add(registry, platform_token, tenant, domains[0]).domains) == domains
    remove(registry, platform_token, tenant, domains[0])
    assert one_more in add(registry, platform_token, tenant, one_more).domains


def test_only_a_platform_admin_adds_or_removes_a_domain(registry, token, platform_token, new_tenant, service_token):
    tenant = new_tenant("cdp")
    domain = fresh_domain()
    for md in (bearer(token(tenant)), bearer(token(tenant, permissions=["tenants.manage"])), bearer(service_token())):
        for method, request_type in (
            (registry.AddCustomDomain, pb.AddCustomDomainRequest),
            (registry.RemoveCustomDomain, pb.RemoveCustomDomainRequest),
        ):
            error = expect_error(method, request_type(tenant_id=tenant, domain=domain), metadata=md)
            assert error.code == grpc.StatusCode.PERMISSION_DENIED, error
    assert resolves_to(registry, domain) is None


def test_list_custom_domains_gives_the_whole_map_to_a_service_page_by_page(
    registry, platform_token, new_tenant, directory, service_token: Callable[..., str]
):
    first, second = fresh_domain("a"), fresh_domain("b")
    tenant_a = new_tenant("cdl", domains=[first])
    tenant_b = new_tenant("cdl")
    add(registry, platform_token, tenant_b, second)
    whole = listed(directory, service_token("gateway"))
    assert (whole[first], whole[second]) == (tenant_a, tenant_b)
    assert listed(directory, service_token("gateway"), page_size=1) == whole
    assert not set(whole.values()) & set(CANARY_TENANTS), "the canary's sentinel hosts are never routed"
    remove(registry, platform_token, tenant_b, second)
    assert second not in listed(directory, service_token("gateway"))
    # An end user's token, even a platform admin's, never reads the directory.
    error = expect_error(
        directory.ListCustomDomains, internal_pb.ListCustomDomainsRequest(), metadata=bearer(platform_token)
    )
    assert error.code == grpc.StatusCode.PERMISSION_DENIED, error
