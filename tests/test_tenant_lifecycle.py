"""A tenant's lifecycle over real gRPC: suspend, reactivate, delete, and what every service makes of it.

Suspension and reactivation must reach every service process within one second (the
issue's requirement): the tests poll the session's sites process and a second one with a
one-second deadline that starts when the registry has answered.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as pb
from towerco.tenant.v1 import tenant_registry_service_pb2_grpc as pb_grpc

from deploy.local.tokens import mint

from .support import RichError, bearer, expect_error, free_port
from .support.metadata import Metadata
from .support.requests import create_site, create_tenant, get_tenant

State = pb.Tenant.State


def list_sites(stub: Any, md: Metadata) -> list[str]:
    reply = stub.ListSites(sites_pb.ListSitesRequest(page_size=100), metadata=md, timeout=10)
    return [site.site_id for site in reply.sites]


def refused(stub: Any, md: Metadata, reason: str) -> Callable[[], RichError]:
    """A check for ``eventually``: ListSites is refused with ``reason``."""

    def check() -> RichError:
        error = expect_error(stub.ListSites, sites_pb.ListSitesRequest(), metadata=md)
        assert error.code == grpc.StatusCode.PERMISSION_DENIED, error
        assert error.reason == reason, error
        return error

    return check


def suspend(registry: Any, platform_token: str, tenant_id: str, reason: str = "invoice overdue") -> pb.Tenant:
    tenant: pb.Tenant = registry.SuspendTenant(
        pb.SuspendTenantRequest(tenant_id=tenant_id, reason=reason), metadata=bearer(platform_token), timeout=10
    )
    return tenant


def delete_and_wait(registry: Any, platform_token: str, tenant_id: str, eventually: Any) -> pb.Tenant:
    deleting = registry.DeleteTenant(
        pb.DeleteTenantRequest(tenant_id=tenant_id), metadata=bearer(platform_token), timeout=10
    )
    assert deleting.state == State.STATE_DELETING

    def deleted() -> pb.Tenant:
        tenant = get_tenant(registry, platform_token, tenant_id)
        assert tenant.state == State.STATE_DELETED, tenant
        return tenant

    result: pb.Tenant = eventually(deleted, within=10, interval=0.1)
    return result


# --- suspend and reactivate ------------------------------------------------------------


def test_suspension_reaches_every_sites_process_within_a_second_and_reactivation_too(
    registry, sites, extra_sites, token, platform_token, tenant_pair, eventually
):
    tenant, other = tenant_pair
    md, other_md = bearer(token(tenant)), bearer(token(other))
    with grpc.insecure_channel(extra_sites().target) as channel:
        second = sites_grpc.SiteServiceStub(channel)
        for stub in (sites, second):  # both processes now hold the tenant as ACTIVE in memory
            assert list_sites(stub, md) == []

        suspended = suspend(registry, platform_token, tenant, "invoice overdue")
        assert (suspended.state, suspended.suspend_reason) == (State.STATE_SUSPENDED, "invoice overdue")
        # One deadline for both processes: each must refuse within 1 s of the suspension.
        errors = eventually(lambda: [refused(stub, md, "TENANT_SUSPENDED")() for stub in (sites, second)])
        for error in errors:
            assert error.info is not None and error.info.metadata["tenant_id"] == tenant
        assert get_tenant(registry, platform_token, tenant) == suspended
        # Every service: the registry refuses the tenant's own users as well.
        error = expect_error(registry.GetTenant, pb.GetTenantRequest(), metadata=md)
        assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "TENANT_SUSPENDED")
        # Other tenants are untouched.
        assert list_sites(sites, other_md) == list_sites(second, other_md) == []

        reactivated = registry.ReactivateTenant(
            pb.ReactivateTenantRequest(tenant_id=tenant), metadata=bearer(platform_token), timeout=10
        )
        assert (reactivated.state, reactivated.suspend_reason) == (State.STATE_ACTIVE, "")
        assert eventually(lambda: [list_sites(stub, md) for stub in (sites, second)]) == [[], []]
        assert registry.GetTenant(pb.GetTenantRequest(), metadata=md, timeout=10).state == State.STATE_ACTIVE


def test_platform_admins_and_public_calls_are_not_blocked_by_a_suspension(
    registry, token, platform_token, tenant_pair, eventually
):
    tenant, _ = tenant_pair
    tenant_md = bearer(token(tenant))
    suspend(registry, platform_token, tenant)
    eventually(lambda: refused_registry(registry, tenant_md))

    as_admin = bearer(platform_token, tenant=tenant)
    assert registry.GetTenant(pb.GetTenantRequest(), metadata=as_admin, timeout=10).state == State.STATE_SUSPENDED
    settings = registry.GetTenantSettings(pb.GetTenantSettingsRequest(), metadata=as_admin, timeout=10)
    assert settings.tenant_id == tenant
    update = pb.UpdateTenantSettingsRequest(settings=pb.TenantSettings(branding=pb.Branding(company_name="Support")))
    update.update_mask.paths.append("branding.company_name")
    assert registry.UpdateTenantSettings(update, metadata=as_admin, timeout=10).branding.company_name == "Support"

    # Public: a suspended tenant's sign-in page still themes itself, and its host resolves.
    assert registry.GetBranding(pb.GetBrandingRequest(tenant_id=tenant), timeout=10).company_name == "Support"
    assert registry.GetBranding(pb.GetBrandingRequest(host=f"{tenant}.localhost"), timeout=10).company_name == "Support"
    assert registry.ResolveTenant(pb.ResolveTenantRequest(host=f"{tenant}.localhost"), timeout=10).tenant_id == tenant


def refused_registry(registry: Any, md: Metadata) -> None:
    error = expect_error(registry.GetTenantSettings, pb.GetTenantSettingsRequest(), metadata=md)
    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "TENANT_SUSPENDED"), error


def test_senseless_transitions_are_failed_precondition(registry, platform_token, new_tenant):
    tenant = new_tenant("trans")
    md = bearer(platform_token)
    error = expect_error(registry.ReactivateTenant, pb.ReactivateTenantRequest(tenant_id=tenant), metadata=md)
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "TENANT_STATE_CONFLICT"), error
    assert get_tenant(registry, platform_token, tenant).state == State.STATE_ACTIVE

    first = suspend(registry, platform_token, tenant, "first reason")
    error = expect_error(
        registry.SuspendTenant, pb.SuspendTenantRequest(tenant_id=tenant, reason="second reason"), metadata=md
    )
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "TENANT_STATE_CONFLICT"), error
    assert get_tenant(registry, platform_token, tenant) == first  # the first reason is kept


def test_a_deleted_tenant_cannot_be_reactivated_suspended_or_deleted_again(
    registry, platform_token, new_tenant, eventually
):
    tenant = new_tenant("gone")
    deleted = delete_and_wait(registry, platform_token, tenant, eventually)
    md = bearer(platform_token)
    for method, request in (
        (registry.ReactivateTenant, pb.ReactivateTenantRequest(tenant_id=tenant)),
        (registry.SuspendTenant, pb.SuspendTenantRequest(tenant_id=tenant, reason="too late")),
        (registry.DeleteTenant, pb.DeleteTenantRequest(tenant_id=tenant)),
    ):
        error = expect_error(method, request, metadata=md)
        assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "TENANT_STATE_CONFLICT"), error
    assert get_tenant(registry, platform_token, tenant) == deleted


@pytest.mark.parametrize(
    ("method", "request_fields", "field"),
    [
        ("SuspendTenant", {"tenant_id": "{t}"}, "reason"),
        ("SuspendTenant", {"tenant_id": "{t}", "reason": "   "}, "reason"),
        ("SuspendTenant", {"tenant_id": "{t}", "reason": "x" * 501}, "reason"),
        ("SuspendTenant", {"reason": "invoice overdue"}, "tenant_id"),
        ("ReactivateTenant", {}, "tenant_id"),
        ("DeleteTenant", {}, "tenant_id"),
        ("SuspendTenant", {"tenant_id": "platform", "reason": "oops"}, "tenant_id"),
        ("DeleteTenant", {"tenant_id": "platform"}, "tenant_id"),
        ("DeleteTenant", {"tenant_id": "Not A Tenant"}, "tenant_id"),
    ],
    ids=[
        "suspend-no-reason",
        "suspend-blank-reason",
        "suspend-long-reason",
        "suspend-no-tenant",
        "reactivate-no-tenant",
        "delete-no-tenant",
        "suspend-platform",
        "delete-platform",
        "delete-malformed-id",
    ],
)
def test_lifecycle_requests_missing_what_they_need_are_invalid_argument(
    registry, platform_token, new_tenant, method, request_fields, field
):
    tenant = new_tenant("inval")
    request_type = getattr(pb, f"{method}Request")
    fields = {name: value.format(t=tenant) for name, value in request_fields.items()}
    error = expect_error(getattr(registry, method), request_type(**fields), metadata=bearer(platform_token))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.fields == [field], error
    assert get_tenant(registry, platform_token, tenant).state == State.STATE_ACTIVE
    assert get_tenant(registry, platform_token, "platform").state == State.STATE_ACTIVE


def test_lifecycle_of_an_unknown_tenant_is_not_found(registry, platform_token):
    unknown = f"none_{uuid.uuid4().hex[:10]}"
    md = bearer(platform_token)
    for method, request in (
        (registry.SuspendTenant, pb.SuspendTenantRequest(tenant_id=unknown, reason="r")),
        (registry.ReactivateTenant, pb.ReactivateTenantRequest(tenant_id=unknown)),
        (registry.DeleteTenant, pb.DeleteTenantRequest(tenant_id=unknown)),
    ):
        error = expect_error(method, request, metadata=md)
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "TENANT_NOT_FOUND"), error


@pytest.mark.parametrize("method", ["SuspendTenant", "ReactivateTenant", "DeleteTenant"])
def test_lifecycle_changes_need_a_platform_admin(registry, token, platform_token, tenant_pair, method):
    tenant, other = tenant_pair
    request = getattr(pb, f"{method}Request")(tenant_id=tenant)
    if method == "SuspendTenant":
        request.reason = "self-service"
    for md in (bearer(token(tenant)), bearer(token(other, permissions=["tenants.manage"]))):
        error = expect_error(getattr(registry, method), request, metadata=md)
        assert error.code == grpc.StatusCode.PERMISSION_DENIED, error
    assert get_tenant(registry, platform_token, tenant).state == State.STATE_ACTIVE


# --- delete ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Deleted:
    """A tenant with a custom domain and two sites, deleted, beside another tenant with two sites."""

    tenant: str
    domain: str
    other: str
    md: Metadata
    other_md: Metadata
    sites_before: list[str]
    deleting: pb.Tenant  # what DeleteTenant answered
    final: pb.Tenant  # once DELETED


@pytest.fixture(scope="module")
def deleted(registry, sites, token, platform_token, eventually) -> Deleted:
    """Deleted once for the tests of what a deletion purges and keeps (each looks at one part)."""
    domain = f"noc.{uuid.uuid4().hex[:10]}.operator.example"
    tenant = create_tenant(registry, platform_token, "del", domains=[domain])
    other = create_tenant(registry, platform_token, "tb")
    md, other_md = bearer(token(tenant)), bearer(token(other))
    for stub_md, prefix in ((md, "DEL"), (other_md, "KEEP")):
        for i in (1, 2):
            create_site(sites, stub_md, f"{prefix}-{i}", name=f"{prefix} {i}")
    sites_before = list_sites(sites, md)

    deleting = registry.DeleteTenant(
        pb.DeleteTenantRequest(tenant_id=tenant), metadata=bearer(platform_token), timeout=10
    )
    eventually(refused(sites, md, "TENANT_DELETED"))

    def is_deleted() -> pb.Tenant:
        current = get_tenant(registry, platform_token, tenant)
        assert current.state == State.STATE_DELETED, current
        return current

    final = eventually(is_deleted, within=10, interval=0.1)
    return Deleted(tenant, domain, other, md, other_md, sites_before, deleting, final)


def test_delete_answers_deleting_and_ends_deleted_without_domains(deleted):
    assert deleted.sites_before == ["DEL-1", "DEL-2"]  # there was something to purge
    assert deleted.deleting.state == State.STATE_DELETING
    assert list(deleted.final.domains) == []


async def test_a_deleted_tenants_sites_are_purged_and_the_other_tenants_kept(admin, deleted):
    assert await admin.fetchval("SELECT count(*) FROM sites.sites WHERE tenant_id = $1", deleted.tenant) == 0
    kept = await admin.fetch("SELECT site_id FROM sites.sites WHERE tenant_id = $1 ORDER BY site_id", deleted.other)
    assert [r["site_id"] for r in kept] == ["KEEP-1", "KEEP-2"]


async def test_a_deleted_tenant_keeps_only_its_tenants_row_in_the_registry(admin, deleted):
    for table, left in (("tenants", 1), ("tenant_settings", 0), ("tenant_users", 0), ("host_routes", 0)):
        count = await admin.fetchval(f"SELECT count(*) FROM tenant.{table} WHERE tenant_id = $1", deleted.tenant)
        assert count == left, table


async def test_the_feature_gates_record_of_a_deleted_tenant_goes_and_the_others_stays(admin, deleted):
    for tenant_id, left in ((deleted.tenant, 0), (deleted.other, 1)):
        count = await admin.fetchval("SELECT count(*) FROM features.tenant_plans WHERE tenant_id = $1", tenant_id)
        assert count == left, tenant_id


def test_a_deleted_tenants_calls_are_refused_and_the_other_tenant_is_served(sites, deleted):
    assert refused(sites, deleted.md, "TENANT_DELETED")().info is not None
    assert list_sites(sites, deleted.other_md) == ["KEEP-1", "KEEP-2"]


def test_a_deleted_tenants_host_names_and_branding_are_not_found(registry, deleted):
    for host in (f"{deleted.tenant}.localhost", deleted.domain):
        error = expect_error(registry.ResolveTenant, pb.ResolveTenantRequest(host=host))
        assert error.code == grpc.StatusCode.NOT_FOUND, (host, error)
    error = expect_error(registry.GetBranding, pb.GetBrandingRequest(tenant_id=deleted.tenant))
    assert error.code == grpc.StatusCode.NOT_FOUND, error


def test_a_deleted_tenants_id_stays_reserved(registry, platform_token, deleted):
    for request_id in ("", f"again-{deleted.tenant}"):
        error = expect_error(
            registry.CreateTenant,
            pb.CreateTenantRequest(
                tenant_id=deleted.tenant,
                request_id=request_id,
                tenant=pb.Tenant(display_name="Reborn", plan="basic", admin_email="noc@reborn.example"),
            ),
            metadata=bearer(platform_token),
        )
        assert (error.code, error.reason) == (grpc.StatusCode.ALREADY_EXISTS, "TENANT_ALREADY_EXISTS"), error
    assert get_tenant(registry, platform_token, deleted.tenant) == deleted.final


async def test_an_unfinished_deletion_resumes_when_a_registry_process_starts(
    registry, sites, token, platform_token, new_tenant, admin, extra_service, eventually
):
    tenant = new_tenant("resume")
    md = bearer(token(tenant))
    sites.CreateSite(sites_pb.CreateSiteRequest(site_id="R-1", site=sites_pb.Site(name="R 1")), metadata=md, timeout=10)
    # A registry process that cannot reach the sites service: its purge keeps failing.
    cut_off = extra_service("tenant", {"SITES_TARGET": f"127.0.0.1:{free_port()}"})
    with grpc.insecure_channel(cut_off.target) as channel:
        deleting = pb_grpc.TenantRegistryServiceStub(channel).DeleteTenant(
            pb.DeleteTenantRequest(tenant_id=tenant), metadata=bearer(platform_token), timeout=10
        )
    assert deleting.state == State.STATE_DELETING
    cut_off.process.terminate()
    cut_off.process.wait(20)
    assert get_tenant(registry, platform_token, tenant).state == State.STATE_DELETING
    assert await admin.fetchval("SELECT count(*) FROM sites.sites WHERE tenant_id = $1", tenant) == 1

    extra_service("tenant")  # a fresh process finishes what the stopped one left
    done = eventually(lambda: assert_state(registry, platform_token, tenant, State.STATE_DELETED), within=10)
    assert done.state == State.STATE_DELETED
    assert await admin.fetchval("SELECT count(*) FROM sites.sites WHERE tenant_id = $1", tenant) == 0


def assert_state(registry: Any, platform_token: str, tenant_id: str, state: int) -> pb.Tenant:
    tenant = get_tenant(registry, platform_token, tenant_id)
    assert tenant.state == state, tenant
    return tenant


async def test_a_deleted_tenant_settings_cannot_be_written_back(
    registry, platform_token, new_tenant, admin, eventually
):
    tenant = new_tenant("gone")
    delete_and_wait(registry, platform_token, tenant, eventually)
    request = pb.UpdateTenantSettingsRequest(
        settings=pb.TenantSettings(tenant_id=tenant, branding=pb.Branding(company_name="Resurrected"))
    )
    request.update_mask.paths.append("branding.company_name")
    error = expect_error(registry.UpdateTenantSettings, request, metadata=bearer(platform_token))
    assert error.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND), error
    # Offboarding removed the tenant's settings; nothing may bring a row back.
    assert await admin.fetchval("SELECT count(*) FROM tenant.tenant_settings WHERE tenant_id = $1", tenant) == 0


# --- listing ---------------------------------------------------------------------------


def list_all(registry: Any, platform_token: str, *, show_deleted: bool) -> list[pb.Tenant]:
    tenants: list[pb.Tenant] = []
    page_token = ""
    for _ in range(10_000):
        page = registry.ListTenants(
            pb.ListTenantsRequest(page_size=2, page_token=page_token, show_deleted=show_deleted),
            metadata=bearer(platform_token),
            timeout=10,
        )
        assert len(page.tenants) <= 2
        assert page.tenants or not page.next_page_token
        tenants.extend(page.tenants)
        page_token = page.next_page_token
        if not page_token:
            return tenants
    raise AssertionError("ListTenants never returned an empty next_page_token")


def test_list_tenants_pages_without_duplicates_and_show_deleted_toggles_deleted_ones(
    registry, platform_token, new_tenant, eventually
):
    prefix = f"ls{uuid.uuid4().hex[:6]}"
    mine = sorted(new_tenant(prefix) for _ in range(5))
    delete_and_wait(registry, platform_token, mine[2], eventually)
    suspend(registry, platform_token, mine[3])

    listed = list_all(registry, platform_token, show_deleted=False)
    ids = [t.tenant_id for t in listed]
    assert len(ids) == len(set(ids)), "a tenant appeared on two pages"
    assert ids == sorted(ids)
    assert [i for i in ids if i.startswith(prefix)] == [mine[0], mine[1], mine[3], mine[4]]
    assert "platform" in ids
    assert State.STATE_DELETED not in {t.state for t in listed}
    states = {t.tenant_id: t.state for t in listed}
    assert states[mine[3]] == State.STATE_SUSPENDED

    with_deleted = list_all(registry, platform_token, show_deleted=True)
    all_ids = [t.tenant_id for t in with_deleted]
    assert len(all_ids) == len(set(all_ids))
    assert all_ids == sorted(all_ids)
    assert [i for i in all_ids if i.startswith(prefix)] == mine
    assert {t.tenant_id: t.state for t in with_deleted}[mine[2]] == State.STATE_DELETED
    assert set(ids) < set(all_ids)


def test_list_tenants_refuses_bad_paging_and_non_platform_callers(registry, platform_token, token, tenant_pair):
    md = bearer(platform_token)
    error = expect_error(registry.ListTenants, pb.ListTenantsRequest(page_size=-1), metadata=md)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    first = registry.ListTenants(pb.ListTenantsRequest(page_size=1), metadata=md, timeout=10)
    assert first.next_page_token
    # A token is only valid with the show_deleted it was issued for.
    error = expect_error(
        registry.ListTenants,
        pb.ListTenantsRequest(page_size=1, page_token=first.next_page_token, show_deleted=True),
        metadata=md,
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    error = expect_error(
        registry.ListTenants, pb.ListTenantsRequest(page_token=first.next_page_token[:-2] + "xx"), metadata=md
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error

    tenant, _ = tenant_pair
    error = expect_error(registry.ListTenants, pb.ListTenantsRequest(), metadata=bearer(token(tenant)))
    assert error.code == grpc.StatusCode.PERMISSION_DENIED, error


# --- unknown tenants -------------------------------------------------------------------


def test_a_token_of_a_tenant_never_provisioned_is_tenant_unknown_until_it_is(
    registry, sites, stack, platform_token, eventually
):
    tenant = f"never_{uuid.uuid4().hex[:10]}"
    md = bearer(mint(stack.keys_dir, tenant=tenant, role="admin"))
    error = refused(sites, md, "TENANT_UNKNOWN")()
    assert error.info is not None and error.info.domain == "towerco.sites.v1.SiteService"
    error = expect_error(registry.GetTenant, pb.GetTenantRequest(), metadata=md)
    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "TENANT_UNKNOWN"), error

    # Both processes now remember "unknown"; creating the tenant must replace that at once.
    registry.CreateTenant(
        pb.CreateTenantRequest(
            tenant_id=tenant,
            request_id=f"req-{tenant}",
            tenant=pb.Tenant(display_name="Late Comer", plan="basic", admin_email="noc@late.example"),
        ),
        metadata=bearer(platform_token),
        timeout=10,
    )
    assert eventually(lambda: list_sites(sites, md)) == []
    assert eventually(lambda: registry.GetTenant(pb.GetTenantRequest(), metadata=md, timeout=10)).tenant_id == tenant
