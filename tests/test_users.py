"""UserService: a tenant's users and custom roles, and their tokens checked by every service (issue 20, part A).

A token whose ``sub`` is a registry user id stands for that user: its state and role are
read through the tenant caches on every call, so a deactivation or a role change applies
to a token already issued, on every service, as soon as the change notice arrives.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from towerco.audit.v1 import audit_log_service_pb2 as audit_pb
from towerco.features.v1 import feature_gate_service_pb2 as features_pb
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb
from towerco.tenant.v1 import user_service_pb2 as pb
from towerco.tenant.v1 import user_service_pb2_grpc as pb_grpc

from .support import bearer, expect_error, rich_error
from .support.requests import set_limit

pytestmark = pytest.mark.stack

DOMAIN = "towerco.tenant.v1.UserService"
#: Each service's check of a token must see a change within this (the notice takes milliseconds).
WITHIN = 5.0


@pytest.fixture(scope="module")
def users(tenant_target: str) -> Any:
    with grpc.insecure_channel(tenant_target) as channel:
        yield pb_grpc.UserServiceStub(channel)


def _create(users: Any, admin: str, email: str, role: str = "operator", **kw: Any) -> pb.User:
    request = pb.CreateUserRequest(user=pb.User(email=email, role=role), **kw)
    user: pb.User = users.CreateUser(request, metadata=bearer(admin), timeout=10)
    return user


def test_users_are_created_read_listed_updated_and_deleted(users: Any, token: Callable[..., str], new_tenant: Any):
    tenant = new_tenant("us")
    admin = token(tenant)
    md = bearer(admin)
    created = _create(users, admin, "  Ann.Lee@Example.COM ", "viewer")
    assert created.email == "ann.lee@example.com"  # trimmed, lower-cased whole
    assert created.user_id.startswith("user-") and created.state == pb.User.STATE_ACTIVE
    assert users.GetUser(pb.GetUserRequest(user_id=created.user_id), metadata=md, timeout=10) == created

    for n in range(3):
        _create(users, admin, f"u{n}@example.com")
    pages, page_token = [], ""
    while True:
        page = users.ListUsers(pb.ListUsersRequest(page_size=2, page_token=page_token), metadata=md, timeout=10)
        pages.append(page.users)
        page_token = page.next_page_token
        if not page_token:
            break
    listed = [u for page in pages for u in page]
    assert len(pages) == 3 and all(len(p) <= 2 for p in pages)
    assert [u.user_id for u in listed] == sorted(u.user_id for u in listed)
    assert len(listed) == 5  # the tenant's administrator from provisioning, and the four above

    update = pb.UpdateUserRequest(
        user=pb.User(user_id=created.user_id, role="operator"), update_mask=field_mask_pb2.FieldMask(paths=["role"])
    )
    assert users.UpdateUser(update, metadata=md, timeout=10).role == "operator"
    bad_mask = pb.UpdateUserRequest(user=update.user, update_mask=field_mask_pb2.FieldMask(paths=["email"]))
    err = expect_error(users.UpdateUser, bad_mask, metadata=md)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.reason == "INVALID_UPDATE_MASK", err
    unknown_role = pb.UpdateUserRequest(user=pb.User(user_id=created.user_id, role="superuser"))
    err = expect_error(users.UpdateUser, unknown_role, metadata=md)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.bad_request is not None, err

    users.DeleteUser(pb.DeleteUserRequest(user_id=created.user_id), metadata=md, timeout=10)
    err = expect_error(users.GetUser, pb.GetUserRequest(user_id=created.user_id), metadata=md)
    assert err.code == grpc.StatusCode.NOT_FOUND and err.reason == "USER_NOT_FOUND", err


def test_email_is_unique_per_tenant_and_free_in_another(users: Any, token: Callable[..., str], tenant_pair: Any):
    x, y = tenant_pair
    _create(users, token(x), "dup@example.com")
    err = expect_error(
        users.CreateUser,
        pb.CreateUserRequest(user=pb.User(email="DUP@example.com ", role="viewer")),
        metadata=bearer(token(x)),
    )
    assert err.code == grpc.StatusCode.ALREADY_EXISTS and err.reason == "USER_ALREADY_EXISTS", err
    in_y = _create(users, token(y), "dup@example.com")
    # x cannot see y's user, by id or in its list.
    err = expect_error(users.GetUser, pb.GetUserRequest(user_id=in_y.user_id), metadata=bearer(token(x)))
    assert err.code == grpc.StatusCode.NOT_FOUND, err
    listed = users.ListUsers(pb.ListUsersRequest(page_size=500), metadata=bearer(token(x)), timeout=10).users
    assert in_y.user_id not in {u.user_id for u in listed}
    err = expect_error(users.DeactivateUser, pb.DeactivateUserRequest(user_id=in_y.user_id), metadata=bearer(token(x)))
    assert err.code == grpc.StatusCode.NOT_FOUND, err


def test_a_retried_create_with_its_request_id_returns_the_same_user(users: Any, token: Callable[..., str], tenant_pair):
    tenant, _ = tenant_pair
    admin = token(tenant)
    first = _create(users, admin, "retry@example.com", request_id="invite-1")
    assert _create(users, admin, "retry@example.com", request_id="invite-1") == first
    err = expect_error(
        users.CreateUser,
        pb.CreateUserRequest(user=pb.User(email="other@example.com", role="viewer"), request_id="invite-1"),
        metadata=bearer(admin),
    )
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err


def test_ten_concurrent_creates_for_the_last_seat_make_exactly_one_user(
    users: Any, features: Any, token: Callable[..., str], platform_token: str, new_tenant: Any
):
    tenant = new_tenant("uq")  # holds its administrator
    set_limit(features, platform_token, tenant, "max_users", 2)
    admin = token(tenant)

    def create(n: int) -> str:
        try:
            _create(users, admin, f"seat{n}@example.com")
            return "OK"
        except grpc.RpcError as exc:
            return rich_error(exc).reason

    with ThreadPoolExecutor(10) as pool:
        outcomes = list(pool.map(create, range(10)))
    assert sorted(outcomes) == ["OK"] + ["QUOTA_EXCEEDED"] * 9, outcomes
    listed = users.ListUsers(pb.ListUsersRequest(), metadata=bearer(admin), timeout=10).users
    assert len(listed) == 2  # nothing half-created by the refused ones


def _calls(registry: Any, sites: Any, features: Any, audit: Any, users: Any) -> dict[str, Callable[[Any], Any]]:
    """One call a tenant admin may make on each service."""
    return {
        "sites": lambda md: sites.ListSites(sites_pb.ListSitesRequest(), metadata=md, timeout=5),
        "features": lambda md: features.GetEntitlements(features_pb.GetEntitlementsRequest(), metadata=md, timeout=5),
        "audit": lambda md: audit.ListEvents(audit_pb.ListEventsRequest(page_size=1), metadata=md, timeout=5),
        "registry": lambda md: registry.GetTenantSettings(tenant_pb.GetTenantSettingsRequest(), metadata=md, timeout=5),
        "users": lambda md: users.ListUsers(pb.ListUsersRequest(page_size=1), metadata=md, timeout=5),
    }


def _refused(call: Callable[[Any], Any], md: Any, reason: str) -> Callable[[], None]:
    def check() -> None:
        try:
            call(md)
        except grpc.RpcError as exc:
            assert rich_error(exc).reason == reason, rich_error(exc)
            return
        raise AssertionError(f"served, expected {reason}")

    return check


def test_a_deactivated_users_token_is_refused_everywhere_and_served_again_when_reactivated(
    registry: Any, sites: Any, features: Any, audit: Any, users: Any, token: Callable[..., str], tenant_pair, eventually
):
    tenant, _ = tenant_pair
    admin = token(tenant)
    user = _create(users, admin, f"noc-{uuid.uuid4().hex[:6]}@example.com", "admin")
    md = bearer(token(tenant, sub=user.user_id))  # a valid token of the user, for the whole test
    calls = _calls(registry, sites, features, audit, users)
    for call in calls.values():
        call(md)  # served, and now in each service's cache

    users.DeactivateUser(pb.DeactivateUserRequest(user_id=user.user_id), metadata=bearer(admin), timeout=10)
    for call in calls.values():
        eventually(_refused(call, md, "USER_DEACTIVATED"), within=WITHIN)
    err = expect_error(lambda r, **kw: calls["sites"](md), None)
    assert err.code == grpc.StatusCode.PERMISSION_DENIED and err.info is not None, err
    assert err.info.metadata["tenant_id"] == tenant

    users.ReactivateUser(pb.ReactivateUserRequest(user_id=user.user_id), metadata=bearer(admin), timeout=10)
    for call in calls.values():
        eventually(lambda call=call: call(md), within=WITHIN)

    users.DeleteUser(pb.DeleteUserRequest(user_id=user.user_id), metadata=bearer(admin), timeout=10)
    for call in calls.values():
        eventually(_refused(call, md, "USER_UNKNOWN"), within=WITHIN)


def test_a_role_change_applies_to_the_token_already_issued(
    sites: Any, users: Any, token: Callable[..., str], tenant_pair, eventually
):
    tenant, _ = tenant_pair
    admin = token(tenant)
    user = _create(users, admin, "promoted@example.com", "viewer")
    # The token claims admin; the registry says viewer, and the registry wins.
    md = bearer(token(tenant, sub=user.user_id))
    create = sites_pb.CreateSiteRequest(site_id="ROLE-1", site=sites_pb.Site(name="Role"))
    err = expect_error(sites.CreateSite, create, metadata=md)
    assert err.code == grpc.StatusCode.PERMISSION_DENIED and err.reason == "PERMISSION_MISSING", err

    users.UpdateUser(
        pb.UpdateUserRequest(user=pb.User(user_id=user.user_id, role="operator")), metadata=bearer(admin), timeout=10
    )
    eventually(lambda: sites.CreateSite(create, metadata=md, timeout=5), within=WITHIN)


def test_a_custom_role_holds_only_permissions_the_plan_allows(users: Any, token: Callable[..., str], new_tenant: Any):
    tenant = new_tenant("ur", plan="professional")  # no `sso`
    md = bearer(token(tenant))
    never = pb.CreateRoleRequest(role=pb.Role(role_id="root", permissions=["sites.read", "tenants.manage", "x.y"]))
    err = expect_error(users.CreateRole, never, metadata=md)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.bad_request is not None, err
    assert len(err.bad_request.field_violations) == 2  # the platform's permission and the unknown one

    not_in_plan = pb.CreateRoleRequest(role=pb.Role(role_id="idp-admin", permissions=["sso.manage"]))
    err = expect_error(users.CreateRole, not_in_plan, metadata=md)
    assert err.code == grpc.StatusCode.PERMISSION_DENIED and err.reason == "FEATURE_NOT_IN_PLAN", err
    assert err.info is not None and err.info.metadata["feature"] == "sso"

    builtin = pb.CreateRoleRequest(role=pb.Role(role_id="admin", permissions=["sites.read"]))
    assert expect_error(users.CreateRole, builtin, metadata=md).code == grpc.StatusCode.INVALID_ARGUMENT

    on_enterprise = bearer(token(new_tenant("ue", plan="enterprise")))
    assert users.CreateRole(not_in_plan, metadata=on_enterprise, timeout=10).permissions == ["sso.manage"]


def test_a_user_with_a_custom_role_has_its_permissions_as_they_change(
    sites: Any, users: Any, token: Callable[..., str], tenant_pair, eventually
):
    tenant, other = tenant_pair
    admin = bearer(token(tenant))
    role = pb.Role(role_id="auditor", permissions=["sites.read"])
    assert users.CreateRole(pb.CreateRoleRequest(role=role), metadata=admin, timeout=10).role_id == "auditor"
    listed = users.ListRoles(pb.ListRolesRequest(), metadata=admin, timeout=10).roles
    assert [(r.role_id, r.built_in) for r in listed] == [
        ("admin", True), ("operator", True), ("viewer", True), ("auditor", False)
    ]  # fmt: skip
    # Another tenant has no such role.
    err = expect_error(
        users.CreateUser,
        pb.CreateUserRequest(user=pb.User(email="a@example.com", role="auditor")),
        metadata=bearer(token(other)),
    )
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err

    user = _create(users, token(tenant), "auditor@example.com", "auditor")
    md = bearer(token(tenant, sub=user.user_id))
    sites.ListSites(sites_pb.ListSitesRequest(), metadata=md, timeout=5)
    create = sites_pb.CreateSiteRequest(site_id="CUSTOM-1", site=sites_pb.Site(name="Custom"))
    assert expect_error(sites.CreateSite, create, metadata=md).reason == "PERMISSION_MISSING"

    grown = pb.Role(role_id="auditor", permissions=["sites.read", "sites.write"])
    users.UpdateRole(pb.UpdateRoleRequest(role=grown), metadata=admin, timeout=10)
    eventually(lambda: sites.CreateSite(create, metadata=md, timeout=5), within=WITHIN)

    err = expect_error(users.DeleteRole, pb.DeleteRoleRequest(role_id="auditor"), metadata=admin)
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION and err.reason == "ROLE_IN_USE", err


async def test_every_change_yields_one_audit_event_without_secrets(
    users: Any, token: Callable[..., str], tenant_pair, admin
):
    tenant, _ = tenant_pair
    md = bearer(token(tenant))
    secret_token = token(tenant)
    user = _create(users, token(tenant), "audited@example.com", "viewer")
    user_id = user.user_id
    users.UpdateUser(pb.UpdateUserRequest(user=pb.User(user_id=user_id, role="operator")), metadata=md, timeout=10)
    users.DeactivateUser(pb.DeactivateUserRequest(user_id=user_id), metadata=md, timeout=10)
    users.DeactivateUser(pb.DeactivateUserRequest(user_id=user_id), metadata=md, timeout=10)  # no change: no event
    users.ReactivateUser(pb.ReactivateUserRequest(user_id=user_id), metadata=md, timeout=10)
    users.DeleteUser(pb.DeleteUserRequest(user_id=user_id), metadata=md, timeout=10)
    users.CreateRole(
        pb.CreateRoleRequest(role=pb.Role(role_id="reader", permissions=["sites.read"])), metadata=md, timeout=10
    )
    users.UpdateRole(
        pb.UpdateRoleRequest(role=pb.Role(role_id="reader", permissions=["audit.read"])), metadata=md, timeout=10
    )
    users.DeleteRole(pb.DeleteRoleRequest(role_id="reader"), metadata=md, timeout=10)
    expected = [
        ("users.create", f"users/{user_id}"),
        ("users.update", f"users/{user_id}"),
        ("users.deactivate", f"users/{user_id}"),
        ("users.reactivate", f"users/{user_id}"),
        ("users.delete", f"users/{user_id}"),
        ("roles.create", "roles/reader"),
        ("roles.update", "roles/reader"),
        ("roles.delete", "roles/reader"),
    ]
    query = (
        "SELECT action, resource, details::text AS details FROM audit.events "
        "WHERE tenant_id = $1 AND (action LIKE 'users.%' OR action LIKE 'roles.%') ORDER BY sequence"
    )
    rows: list[Any] = []
    for _ in range(150):  # the relay delivers within a few seconds
        rows = await admin.fetch(query, tenant)
        if len(rows) >= len(expected):
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)  # a late duplicate would show up by now
    rows = await admin.fetch(query, tenant)
    assert [(r["action"], r["resource"]) for r in rows] == expected
    for row in rows:
        assert secret_token not in row["details"] and "token" not in row["details"].lower()


def test_the_provisioned_administrator_is_a_user_with_a_normalised_email(
    users: Any, token: Callable[..., str], new_tenant: Any
):
    tenant = new_tenant("un", admin_email="NOC@Mixed-Case.Example")
    md = bearer(token(tenant))
    listed = users.ListUsers(pb.ListUsersRequest(), metadata=md, timeout=10).users
    assert [(u.email, u.role) for u in listed] == [("noc@mixed-case.example", "admin")]
    err = expect_error(
        users.CreateUser, pb.CreateUserRequest(user=pb.User(email="noc@mixed-case.example", role="viewer")), metadata=md
    )
    assert err.reason == "USER_ALREADY_EXISTS", err


def test_through_the_gateway_users_are_managed_and_a_deactivated_users_token_refused(
    gateway: Any, token: Callable[..., str], tenant_pair, eventually
):
    tenant, _ = tenant_pair
    admin = token(tenant)
    options = [("grpc.default_authority", f"{tenant}.localhost")]
    with grpc.insecure_channel(f"127.0.0.1:{gateway.port}", options=options) as channel:
        edge_users, edge_sites = pb_grpc.UserServiceStub(channel), sites_grpc.SiteServiceStub(channel)
        user = _create(edge_users, admin, "edge@example.com", "viewer")
        md = bearer(token(tenant, sub=user.user_id))

        def list_sites(metadata: Any) -> Any:
            return edge_sites.ListSites(sites_pb.ListSitesRequest(), metadata=metadata, timeout=5)

        list_sites(md)
        edge_users.DeactivateUser(pb.DeactivateUserRequest(user_id=user.user_id), metadata=bearer(admin), timeout=10)
        eventually(_refused(list_sites, md, "USER_DEACTIVATED"), within=WITHIN)
        edge_users.ReactivateUser(pb.ReactivateUserRequest(user_id=user.user_id), metadata=bearer(admin), timeout=10)
        eventually(lambda: list_sites(md), within=WITHIN)


async def test_the_last_seat_taken_is_told_as_usage_thresholds_of_max_users(
    users: Any, features: Any, token: Callable[..., str], platform_token: str, new_tenant: Any, admin: Any
):
    tenant = new_tenant("ut")  # its administrator holds 1 of 2 seats
    set_limit(features, platform_token, tenant, "max_users", 2)
    _create(users, token(tenant), "second@example.com")
    query = "SELECT details FROM audit.events WHERE tenant_id = $1 AND action = 'usage.threshold_reached'"
    rows: list[Any] = []
    for _ in range(150):  # the relay delivers within a few seconds
        rows = await admin.fetch(query, tenant)
        if len(rows) >= 2:
            break
        await asyncio.sleep(0.1)
    details = sorted((json.loads(r["details"]) for r in rows), key=lambda d: d["threshold_percent"])
    assert [(d["resource"], d["threshold_percent"], d["usage"]) for d in details] == [
        ("max_users", 80, 2), ("max_users", 100, 2)
    ]  # fmt: skip
