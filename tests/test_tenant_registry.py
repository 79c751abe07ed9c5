"""The tenant registry over real gRPC: provisioning, host names, branding and isolation.

Every test makes its own tenants (random ids), so none depends on another's leftovers.
What the registry wrote is checked in PostgreSQL as the superuser, never through the
registry alone.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.tenant.v1 import tenant_registry_service_pb2 as pb
from towerco.tenant.v1 import tenant_registry_service_pb2_grpc as pb_grpc

from deploy.local.tokens import mint

from .support import bearer, expect_error
from .support.requests import get_tenant

DOMAIN = "towerco.tenant.v1.TenantRegistryService"
SITES_DOMAIN = "towerco.sites.v1.SiteService"
State = pb.Tenant.State


def fresh_id(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def fresh_domain(label: str = "noc") -> str:
    return f"{label}.{uuid.uuid4().hex[:10]}.operator.example"


def create_request(tenant_id: str, request_id: str = "", **fields: Any) -> pb.CreateTenantRequest:
    tenant = pb.Tenant(
        display_name=fields.pop("display_name", "Coastal Towers"),
        plan=fields.pop("plan", "basic"),
        admin_email=fields.pop("admin_email", "noc@coastal.example"),
        **fields,
    )
    return pb.CreateTenantRequest(tenant_id=tenant_id, tenant=tenant, request_id=request_id)


def assert_no_tenant(registry: Any, platform_token: str, tenant_id: str) -> None:
    error = expect_error(registry.GetTenant, pb.GetTenantRequest(tenant_id=tenant_id), metadata=bearer(platform_token))
    assert error.code == grpc.StatusCode.NOT_FOUND, error
    assert error.reason == "TENANT_NOT_FOUND"


async def registry_rows(admin: Any, tenant_id: str) -> dict[str, int]:
    counts = {}
    for table in ("tenants", "tenant_settings", "tenant_users", "host_routes"):
        counts[table] = await admin.fetchval(f"SELECT count(*) FROM tenant.{table} WHERE tenant_id = $1", tenant_id)
    return counts


# --- provisioning ----------------------------------------------------------------------


@dataclass(frozen=True)
class Onboarded:
    """One CreateTenant by the platform admin: what it was asked and what it answered."""

    tenant_id: str
    domain: str
    created: pb.Tenant


@pytest.fixture(scope="module")
def onboarded(registry, platform_token) -> Onboarded:
    """A tenant made once for the tests of what CreateTenant makes (each reads one part of it)."""
    tenant_id = fresh_id("prov")
    domain = fresh_domain()
    request = create_request(tenant_id, "onboard-1", display_name="Coastal Towers", plan="enterprise", domains=[domain])
    created = registry.CreateTenant(request, metadata=bearer(platform_token), timeout=10)
    return Onboarded(tenant_id, domain, created)


def test_create_tenant_answers_the_tenant_active_with_the_fields_asked_for(onboarded):
    created = onboarded.created
    assert created.tenant_id == onboarded.tenant_id
    assert created.state == State.STATE_ACTIVE
    assert (created.display_name, created.plan, created.admin_email) == (
        "Coastal Towers",
        "enterprise",
        "noc@coastal.example",
    )
    assert list(created.domains) == [onboarded.domain]
    assert created.create_time.seconds > 0


def test_a_created_tenant_reads_back_as_create_tenant_answered(registry, platform_token, onboarded):
    assert get_tenant(registry, platform_token, onboarded.tenant_id) == onboarded.created


def test_a_created_tenant_has_default_settings_branded_with_its_name(registry, platform_token, onboarded):
    settings = registry.GetTenantSettings(
        pb.GetTenantSettingsRequest(tenant_id=onboarded.tenant_id), metadata=bearer(platform_token), timeout=10
    )
    assert settings.tenant_id == onboarded.tenant_id
    assert settings.branding.company_name == "Coastal Towers"
    assert (settings.branding.primary_color, settings.branding.secondary_color) == ("#3B82F6", "#6B7280")
    assert (settings.localization.timezone, settings.localization.date_format) == ("UTC", "YYYY-MM-DD")
    assert (settings.localization.currency, settings.localization.language) == ("USD", "en")


async def test_a_created_tenant_has_its_admin_email_as_its_one_admin_user(admin, onboarded):
    users = await admin.fetch("SELECT email, role FROM tenant.tenant_users WHERE tenant_id = $1", onboarded.tenant_id)
    assert [(u["email"], u["role"]) for u in users] == [("noc@coastal.example", "admin")]


async def test_a_created_tenant_has_one_row_in_each_registry_table(admin, onboarded):
    assert await registry_rows(admin, onboarded.tenant_id) == {
        "tenants": 1,
        "tenant_settings": 1,
        "tenant_users": 1,
        "host_routes": 1,
    }


async def test_same_request_id_twice_gives_one_tenant(registry, platform_token, admin):
    tenant_id = fresh_id("idem")
    request = create_request(tenant_id, f"req-{tenant_id}")
    first = registry.CreateTenant(request, metadata=bearer(platform_token), timeout=10)
    second = registry.CreateTenant(request, metadata=bearer(platform_token), timeout=10)

    assert second.state == State.STATE_ACTIVE
    assert second.create_time == first.create_time
    assert second.tenant_id == first.tenant_id
    assert await registry_rows(admin, tenant_id) == {
        "tenants": 1,
        "tenant_settings": 1,
        "tenant_users": 1,
        "host_routes": 0,
    }


async def test_the_same_request_sent_concurrently_gives_one_tenant(registry, platform_token, admin):
    tenant_id = fresh_id("race")
    request = create_request(tenant_id, f"req-{tenant_id}", domains=[fresh_domain()])

    def send(_: int) -> pb.Tenant:
        tenant: pb.Tenant = registry.CreateTenant(request, metadata=bearer(platform_token), timeout=20)
        return tenant

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(send, range(6)))
    assert {r.state for r in results} == {State.STATE_ACTIVE}
    assert len({r.create_time.ToNanoseconds() for r in results}) == 1
    assert await registry_rows(admin, tenant_id) == {
        "tenants": 1,
        "tenant_settings": 1,
        "tenant_users": 1,
        "host_routes": 1,
    }


@pytest.mark.parametrize("request_id", ["", "another-request"], ids=["no-request-id", "other-request-id"])
def test_another_create_for_an_existing_id_is_already_exists(registry, platform_token, request_id):
    tenant_id = fresh_id("dup")
    first = registry.CreateTenant(
        create_request(tenant_id, f"first-{tenant_id}"), metadata=bearer(platform_token), timeout=10
    )
    error = expect_error(
        registry.CreateTenant,
        create_request(tenant_id, request_id, display_name="Someone Else"),
        metadata=bearer(platform_token),
    )
    assert error.code == grpc.StatusCode.ALREADY_EXISTS, error
    assert error.reason == "TENANT_ALREADY_EXISTS"
    assert error.info is not None and error.info.domain == DOMAIN
    assert get_tenant(registry, platform_token, tenant_id) == first


def test_same_request_id_with_another_body_is_request_id_reused(registry, platform_token):
    tenant_id = fresh_id("reuse")
    request_id = f"req-{tenant_id}"
    first = registry.CreateTenant(create_request(tenant_id, request_id), metadata=bearer(platform_token), timeout=10)
    error = expect_error(
        registry.CreateTenant,
        create_request(tenant_id, request_id, plan="enterprise"),
        metadata=bearer(platform_token),
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.reason == "REQUEST_ID_REUSED"
    assert error.fields == ["request_id"]
    assert get_tenant(registry, platform_token, tenant_id).plan == first.plan == "basic"


@pytest.mark.parametrize("tenant_id", ["www", "api", "admin", "platform", "gateway"])
def test_reserved_tenant_ids_are_refused(registry, platform_token, tenant_id):
    error = expect_error(registry.CreateTenant, create_request(tenant_id), metadata=bearer(platform_token))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.fields == ["tenant_id"], error
    if tenant_id == "platform":  # the platform's own tenant exists, and stays as it was
        assert get_tenant(registry, platform_token, tenant_id).display_name == "Towerco platform"
    else:
        assert_no_tenant(registry, platform_token, tenant_id)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"plan": "gold"}, "tenant.plan"),
        ({"plan": ""}, "tenant.plan"),
        ({"admin_email": "not-an-email"}, "tenant.admin_email"),
        ({"admin_email": ""}, "tenant.admin_email"),
        ({"display_name": ""}, "tenant.display_name"),
        ({"display_name": "x" * 101}, "tenant.display_name"),
        ({"domains": ["Upper.Operator.example"]}, "tenant.domains[0]"),
        ({"domains": ["noc.operator.example", "has space.example"]}, "tenant.domains[1]"),
        ({"domains": ["intranet"]}, "tenant.domains[0]"),
        ({"domains": ["evil.localhost"]}, "tenant.domains[0]"),
        ({"domains": ["10.0.0.1"]}, "tenant.domains[0]"),
        ({"domains": ["noc.operator.example", "noc.operator.example"]}, "tenant.domains[1]"),
    ],
    ids=[
        "unknown-plan",
        "no-plan",
        "bad-email",
        "no-email",
        "no-display-name",
        "long-display-name",
        "upper-case-domain",
        "domain-with-space",
        "single-label-domain",
        "platform-subdomain",
        "ip-address-domain",
        "duplicate-domain",
    ],
)
def test_bad_tenant_fields_are_refused_by_name(registry, platform_token, fields, field):
    tenant_id = fresh_id("bad")
    error = expect_error(registry.CreateTenant, create_request(tenant_id, **fields), metadata=bearer(platform_token))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.fields == [field], error
    assert_no_tenant(registry, platform_token, tenant_id)


async def test_a_taken_custom_domain_is_already_exists_and_leaves_no_half_made_tenant(
    registry, platform_token, new_tenant, admin
):
    domain = fresh_domain("aiops")
    owner = new_tenant("owner", domains=[domain])
    tenant_id = fresh_id("late")
    error = expect_error(
        registry.CreateTenant,
        create_request(tenant_id, f"req-{tenant_id}", domains=[fresh_domain(), domain]),
        metadata=bearer(platform_token),
    )
    assert error.code == grpc.StatusCode.ALREADY_EXISTS, error
    assert error.reason == "DOMAIN_ALREADY_EXISTS"
    assert error.info is not None and error.info.metadata["name"] == domain

    assert_no_tenant(registry, platform_token, tenant_id)
    assert await registry_rows(admin, tenant_id) == dict.fromkeys(
        ("tenants", "tenant_settings", "tenant_users", "host_routes"), 0
    )
    assert await admin.fetchval("SELECT tenant_id FROM tenant.host_routes WHERE host = $1", domain) == owner
    # The id was not burnt: the same request with a free domain goes through.
    created = registry.CreateTenant(
        create_request(tenant_id, f"req2-{tenant_id}", domains=[fresh_domain()]),
        metadata=bearer(platform_token),
        timeout=10,
    )
    assert created.state == State.STATE_ACTIVE


@pytest.mark.parametrize(
    "permissions",
    [None, ["tenants.manage", "tenants.read"]],
    ids=["tenant-admin", "tenant-admin-granted-tenants-manage"],
)
def test_create_tenant_needs_a_platform_admin(registry, platform_token, token, tenant_pair, permissions):
    tenant, _ = tenant_pair
    tenant_id = fresh_id("nope")
    error = expect_error(
        registry.CreateTenant,
        create_request(tenant_id, f"req-{tenant_id}"),
        metadata=bearer(token(tenant, permissions=permissions)),
    )
    assert error.code == grpc.StatusCode.PERMISSION_DENIED, error
    assert error.reason == ("PERMISSION_MISSING" if permissions is None else "PLATFORM_ADMIN_REQUIRED")
    assert_no_tenant(registry, platform_token, tenant_id)


def test_a_failure_after_the_first_transaction_leaves_provisioning_and_a_retry_completes_it(
    registry, platform_token, stack, sites, extra_service, eventually
):
    faulty = extra_service("tenant", {"FAULT_POINTS": "provision.after_commit:1"})
    tenant_id = fresh_id("half")
    request = create_request(tenant_id, f"req-{tenant_id}")
    tenant_token = mint(stack.keys_dir, tenant=tenant_id, role="admin")  # not provisioned by a fixture
    with grpc.insecure_channel(faulty.target) as channel:
        faulty_registry = pb_grpc.TenantRegistryServiceStub(channel)
        error = expect_error(faulty_registry.CreateTenant, request, metadata=bearer(platform_token))
    assert error.code == grpc.StatusCode.UNAVAILABLE, error
    assert error.reason == "PROVISIONING_INCOMPLETE"
    assert error.retry is not None and error.retry.retry_delay.seconds + error.retry.retry_delay.nanos > 0

    assert get_tenant(registry, platform_token, tenant_id).state == State.STATE_PROVISIONING
    # Nothing treats the half-made tenant as in service: no host resolves to it, no branding.
    for method, lookup in (
        (registry.ResolveTenant, pb.ResolveTenantRequest(host=f"{tenant_id}.localhost")),
        (registry.GetBranding, pb.GetBrandingRequest(tenant_id=tenant_id)),
    ):
        hidden = expect_error(method, lookup)
        assert hidden.code == grpc.StatusCode.NOT_FOUND, hidden
    refused = expect_error(sites.ListSites, sites_pb.ListSitesRequest(), metadata=bearer(tenant_token))
    assert refused.code == grpc.StatusCode.PERMISSION_DENIED, refused
    assert refused.reason == "TENANT_PROVISIONING"
    assert refused.info is not None and refused.info.domain == SITES_DOMAIN

    retried = registry.CreateTenant(request, metadata=bearer(platform_token), timeout=10)
    assert retried.state == State.STATE_ACTIVE
    assert get_tenant(registry, platform_token, tenant_id).state == State.STATE_ACTIVE
    listed = eventually(lambda: sites.ListSites(sites_pb.ListSitesRequest(), metadata=bearer(tenant_token), timeout=10))
    assert list(listed.sites) == []


# --- host names and branding -----------------------------------------------------------


@pytest.mark.parametrize("form", ["{t}.localhost", "{t}.localhost:8080", "{T}.LOCALHOST", "{t}.localhost."])
def test_resolve_tenant_by_platform_subdomain(registry, new_tenant, form):
    tenant_id = new_tenant("res")
    host = form.format(t=tenant_id, T=tenant_id.upper())
    reply = registry.ResolveTenant(pb.ResolveTenantRequest(host=host), timeout=10)
    assert reply.tenant_id == tenant_id


@pytest.mark.parametrize("form", ["{d}", "{D}:443"])
def test_resolve_tenant_by_custom_domain(registry, new_tenant, form):
    domain = fresh_domain("aiops")
    tenant_id = new_tenant("cust", domains=[domain])
    reply = registry.ResolveTenant(pb.ResolveTenantRequest(host=form.format(d=domain, D=domain.upper())), timeout=10)
    assert reply.tenant_id == tenant_id


@pytest.mark.parametrize(
    "host",
    [
        "{unknown}.localhost",
        "unknown.{uid}.operator.example",
        "{t}.localhost.evil.example",
        "deep.{t}.localhost",
        "localhost",
    ],
)
def test_resolve_unknown_host_is_not_found(registry, new_tenant, host):
    tenant_id = new_tenant("res")  # exists, so a lookalike host must not find it
    uid = uuid.uuid4().hex[:10]
    error = expect_error(
        registry.ResolveTenant,
        pb.ResolveTenantRequest(host=host.format(unknown=fresh_id("none"), uid=uid, t=tenant_id)),
    )
    assert error.code == grpc.StatusCode.NOT_FOUND, error
    assert error.info is not None and error.info.domain == DOMAIN


@pytest.mark.parametrize("host", ["", "   ", "bad host.example", "a..b.example", "tenant/x.localhost", "-bad.example"])
def test_resolve_malformed_host_is_invalid_argument(registry, host):
    error = expect_error(registry.ResolveTenant, pb.ResolveTenantRequest(host=host))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.fields == ["host"]


def test_get_branding_by_host_without_a_token(registry, platform_token, new_tenant):
    domain = fresh_domain("aiops")
    tenant_id = new_tenant("brand", display_name="Acme Towers", domains=[domain], plan="enterprise")  # its colours
    update = pb.UpdateTenantSettingsRequest(
        settings=pb.TenantSettings(
            tenant_id=tenant_id,
            branding=pb.Branding(primary_color="#112233", secondary_color="#445566", company_name="Acme"),
            integrations=pb.Integrations(api_keys={"pagerduty": "sk-branding-must-not-leak"}),
        ),
    )
    update.update_mask.paths.extend(["branding", "integrations.api_keys"])
    registry.UpdateTenantSettings(update, metadata=bearer(platform_token), timeout=10)

    for host in (f"{tenant_id}.localhost:8080", domain):
        branding = registry.GetBranding(pb.GetBrandingRequest(host=host), timeout=10)
        assert branding.display_name == "Acme Towers"
        assert (branding.company_name, branding.primary_color, branding.secondary_color) == (
            "Acme",
            "#112233",
            "#445566",
        )
        assert "sk-branding-must-not-leak" not in str(branding)
    by_id = registry.GetBranding(pb.GetBrandingRequest(tenant_id=tenant_id), timeout=10)
    assert by_id == branding


@pytest.mark.parametrize(
    "request_fields", [{}, {"host": "x.localhost", "tenant_id": "tenant_a"}], ids=["neither", "both"]
)
def test_get_branding_needs_exactly_one_of_host_and_tenant_id(registry, request_fields):
    error = expect_error(registry.GetBranding, pb.GetBrandingRequest(**request_fields))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert sorted(error.fields) == ["host", "tenant_id"]


def test_get_branding_of_unknown_tenant_is_not_found(registry):
    for request in (pb.GetBrandingRequest(tenant_id=fresh_id("none")), pb.GetBrandingRequest(host="x.example.org")):
        error = expect_error(registry.GetBranding, request)
        assert error.code == grpc.StatusCode.NOT_FOUND, error


# --- isolation -------------------------------------------------------------------------


async def test_tenant_b_cannot_read_or_change_tenant_a_record_or_settings(registry, token, tenant_pair, admin):
    tenant_a, tenant_b = tenant_pair
    a_md, b_md = bearer(token(tenant_a)), bearer(token(tenant_b))
    record_before = registry.GetTenant(pb.GetTenantRequest(), metadata=a_md, timeout=10)
    settings_before = registry.GetTenantSettings(pb.GetTenantSettingsRequest(), metadata=a_md, timeout=10)
    document_before = await admin.fetchval(
        "SELECT document::text FROM tenant.tenant_settings WHERE tenant_id = $1", tenant_a
    )

    takeover = pb.UpdateTenantSettingsRequest(
        settings=pb.TenantSettings(tenant_id=tenant_a, branding=pb.Branding(company_name="Hijacked"))
    )
    takeover.update_mask.paths.append("branding.company_name")
    header_takeover = pb.UpdateTenantSettingsRequest(settings=pb.TenantSettings(branding=takeover.settings.branding))
    header_takeover.update_mask.CopyFrom(takeover.update_mask)
    attempts: list[tuple[Callable[..., Any], Any, Any]] = [
        (registry.GetTenant, pb.GetTenantRequest(tenant_id=tenant_a), b_md),
        (registry.GetTenantSettings, pb.GetTenantSettingsRequest(tenant_id=tenant_a), b_md),
        (registry.UpdateTenantSettings, takeover, b_md),
        # The header a gateway would set is no way round it either.
        (registry.GetTenant, pb.GetTenantRequest(), bearer(token(tenant_b), tenant=tenant_a)),
        (registry.GetTenantSettings, pb.GetTenantSettingsRequest(), bearer(token(tenant_b), tenant=tenant_a)),
        (registry.UpdateTenantSettings, header_takeover, bearer(token(tenant_b), tenant=tenant_a)),
    ]
    for method, request, md in attempts:
        error = expect_error(method, request, metadata=md)
        assert error.code == grpc.StatusCode.PERMISSION_DENIED, (method, error)
        assert error.reason == "CROSS_TENANT_DENIED", (method, error)

    assert registry.GetTenant(pb.GetTenantRequest(), metadata=a_md, timeout=10) == record_before
    assert registry.GetTenantSettings(pb.GetTenantSettingsRequest(), metadata=a_md, timeout=10) == settings_before
    assert (
        await admin.fetchval("SELECT document::text FROM tenant.tenant_settings WHERE tenant_id = $1", tenant_a)
        == document_before
    )
    # Its own record and settings stay readable to tenant_b.
    assert registry.GetTenant(pb.GetTenantRequest(), metadata=b_md, timeout=10).tenant_id == tenant_b


def test_a_tenant_reads_its_own_record_and_a_platform_admin_any(registry, token, platform_token, tenant_pair):
    tenant_a, _ = tenant_pair
    own = registry.GetTenant(pb.GetTenantRequest(), metadata=bearer(token(tenant_a, role="viewer")), timeout=10)
    assert own.tenant_id == tenant_a
    assert get_tenant(registry, platform_token, tenant_a) == own
    via_header = registry.GetTenant(pb.GetTenantRequest(), metadata=bearer(platform_token, tenant=tenant_a), timeout=10)
    assert via_header == own
