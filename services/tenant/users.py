"""towerco.tenant.v1.UserService: a tenant's users and custom roles, always the caller's own tenant.

Each change is one transaction that bumps the tenant's version (one user change of a tenant
at a time), writes one audit event, and after commit is published like any change of the
tenant: every service's cached access of the tenant's users is dropped, so a deactivation,
deletion or role change applies to the users' next calls everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import empty_pb2
from grpc import aio
from towerco.tenant.v1 import user_service_pb2 as pb
from towerco.tenant.v1 import user_service_pb2_grpc as pb_grpc

from services.runtime import context, entitlements, idempotency
from services.runtime.errors import (
    ErrorReason,
    FieldViolation,
    already_exists,
    failed_precondition,
    invalid_argument,
    not_found,
    permission_denied,
)
from services.runtime.field_behavior import ignored_on_create
from services.runtime.ids import ROLE_ID
from services.runtime.pagination import page_size
from services.runtime.plans import UNLIMITED
from services.runtime.roles import ROLE_PERMISSIONS, TENANT_ROLES, needs_feature, ungrantable
from services.runtime.server import Runtime
from services.runtime.validation import Violations

from . import queries, records, user_records
from .user_records import Conn, Row, user_from_row

Ctx = aio.ServicerContext[Any, Any]
CREATE_IGNORES = ignored_on_create(pb.CreateUserRequest.DESCRIPTOR, "user")
User = pb.User


class UserServicer(pb_grpc.UserServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._db = runtime.db
        self._cache = runtime.cache
        self._tokens = runtime.page_tokens
        self._audit = runtime.audit
        self._entitlements = runtime.entitlements

    # ---- users --------------------------------------------------------------------------

    async def CreateUser(self, request: pb.CreateUserRequest, ctx: Ctx) -> pb.User:
        email = user_records.normalise_email(request.user.email)
        v = Violations()
        user_records.check_email(v, "user.email", email)
        if not request.user.role:
            v.add("user.role", "is required")
        idempotency.check_request_id(v, request.request_id)
        v.raise_if_any()
        tenant_id = context.current_tenant()
        request_hash = idempotency.request_hash(request, CREATE_IGNORES)
        max_users = await self._limit(tenant_id, "max_users")
        async with self._db.transaction() as conn:
            if request.request_id:
                replay = await conn.fetchrow(queries.GET_USER_BY_REQUEST, tenant_id, request.request_id)
                if replay is not None:
                    idempotency.check_same_request(replay["request_hash"], request_hash, "create user request")
                    return user_from_row(replay)
            await _check_role(conn, tenant_id, "user.role", request.user.role)
            row, tenant = await user_records.create_user(
                conn,
                self._audit,
                tenant_id,
                email,
                request.user.role,
                max_users,
                request_id=request.request_id,
                request_hash=request_hash,
            )
        await records.publish(self._cache, tenant)
        return user_from_row(row)

    async def GetUser(self, request: pb.GetUserRequest, ctx: Ctx) -> pb.User:
        _check_user_id(request.user_id)
        tenant_id = context.current_tenant()
        async with self._db.transaction(readonly=True) as conn:
            row = await conn.fetchrow(queries.GET_USER, tenant_id, request.user_id)
        if row is None:
            raise not_found(ErrorReason.USER_NOT_FOUND, request.user_id)
        return user_from_row(row)

    async def ListUsers(self, request: pb.ListUsersRequest, ctx: Ctx) -> pb.ListUsersResponse:
        rows, following, _ = await self._page(request.page_size, request.page_token, queries.LIST_USERS, "user_id")
        return pb.ListUsersResponse(users=[user_from_row(r) for r in rows], next_page_token=following)

    async def UpdateUser(self, request: pb.UpdateUserRequest, ctx: Ctx) -> pb.User:
        _check_mask(request.update_mask.paths, "role")
        _check_user_id(request.user.user_id, "user.user_id")
        if not request.user.role:
            raise invalid_argument([FieldViolation("user.role", "is required")])
        tenant_id = context.current_tenant()
        user_id, role = request.user.user_id, request.user.role
        async with self._db.transaction() as conn:
            await _check_role(conn, tenant_id, "user.role", role)
            tenant = await user_records.lock_users(conn, tenant_id)
            row = await conn.fetchrow(queries.SET_USER_ROLE, tenant_id, user_id, role)
            if row is None:
                raise not_found(ErrorReason.USER_NOT_FOUND, user_id)
            await self._audit.record(conn, "users.update", f"users/{user_id}", {"role": role})
        await records.publish(self._cache, tenant)
        return user_from_row(row)

    async def DeactivateUser(self, request: pb.DeactivateUserRequest, ctx: Ctx) -> pb.User:
        return await self._set_state(request.user_id, User.STATE_DEACTIVATED, "users.deactivate")

    async def ReactivateUser(self, request: pb.ReactivateUserRequest, ctx: Ctx) -> pb.User:
        return await self._set_state(request.user_id, User.STATE_ACTIVE, "users.reactivate")

    async def DeleteUser(self, request: pb.DeleteUserRequest, ctx: Ctx) -> empty_pb2.Empty:
        _check_user_id(request.user_id)
        tenant_id = context.current_tenant()
        async with self._db.transaction() as conn:
            tenant = await user_records.lock_users(conn, tenant_id)
            if await conn.execute(queries.DELETE_USER, tenant_id, request.user_id) == "DELETE 0":
                raise not_found(ErrorReason.USER_NOT_FOUND, request.user_id)
            await self._audit.record(conn, "users.delete", f"users/{request.user_id}")
        await records.publish(self._cache, tenant)
        return empty_pb2.Empty()

    async def _set_state(self, user_id: str, state: pb.User.State.ValueType, action: str) -> pb.User:
        _check_user_id(user_id)
        tenant_id = context.current_tenant()
        async with self._db.transaction() as conn:
            tenant = await user_records.lock_users(conn, tenant_id)
            row: Row | None = await conn.fetchrow(queries.GET_USER, tenant_id, user_id)
            if row is None:
                raise not_found(ErrorReason.USER_NOT_FOUND, user_id)
            if row["state"] != User.State.Name(state):  # the same state again is no change, and not audited
                row = await conn.fetchrow(queries.SET_USER_STATE, tenant_id, user_id, User.State.Name(state))
                assert row is not None, "the tenant's lock is held: the user read above is still there"
                await self._audit.record(conn, action, f"users/{user_id}")
        await records.publish(self._cache, tenant)
        return user_from_row(row)

    # ---- custom roles -------------------------------------------------------------------

    async def CreateRole(self, request: pb.CreateRoleRequest, ctx: Ctx) -> pb.Role:
        return await self._write_role(request.role, queries.INSERT_ROLE, "roles.create", create=True)

    async def ListRoles(self, request: pb.ListRolesRequest, ctx: Ctx) -> pb.ListRolesResponse:
        rows, following, first = await self._page(request.page_size, request.page_token, queries.LIST_ROLES, "role_id")
        # The built-in roles lead the first page.
        built_in = [pb.Role(role_id=r, permissions=ROLE_PERMISSIONS[r], built_in=True) for r in TENANT_ROLES if first]
        return pb.ListRolesResponse(roles=[*built_in, *(_role(r) for r in rows)], next_page_token=following)

    async def UpdateRole(self, request: pb.UpdateRoleRequest, ctx: Ctx) -> pb.Role:
        _check_mask(request.update_mask.paths, "permissions")
        return await self._write_role(request.role, queries.SET_ROLE_PERMISSIONS, "roles.update", create=False)

    async def DeleteRole(self, request: pb.DeleteRoleRequest, ctx: Ctx) -> empty_pb2.Empty:
        v = Violations()
        v.identifier("role_id", request.role_id, ROLE_ID)
        v.raise_if_any()
        tenant_id = context.current_tenant()
        async with self._db.transaction() as conn:
            tenant = await user_records.lock_users(conn, tenant_id)
            holders: int = await conn.fetchval(queries.COUNT_ROLE_USERS, tenant_id, request.role_id)
            if holders:
                raise failed_precondition(
                    f"{holders} user(s) hold role {request.role_id!r}; give them another role first",
                    ErrorReason.ROLE_IN_USE,
                    role=request.role_id,
                    users=str(holders),
                )
            if await conn.execute(queries.DELETE_ROLE, tenant_id, request.role_id) == "DELETE 0":
                raise not_found(ErrorReason.ROLE_NOT_FOUND, request.role_id)
            await self._audit.record(conn, "roles.delete", f"roles/{request.role_id}")
        await records.publish(self._cache, tenant)
        return empty_pb2.Empty()

    async def _write_role(self, role: pb.Role, query: str, action: str, *, create: bool) -> pb.Role:
        """CreateRole's insert or UpdateRole's replacement of a custom role's permissions, checked first."""
        role_id, permissions = role.role_id, sorted(set(role.permissions))
        v = Violations()
        v.identifier("role.role_id", role_id, ROLE_ID)
        if create and role_id in ROLE_PERMISSIONS:
            v.add("role.role_id", f"{role_id!r} is a built-in role")
        tenant_id = context.current_tenant()
        await self._check_permissions(v, tenant_id, permissions)
        async with self._db.transaction() as conn:
            tenant = await user_records.lock_users(conn, tenant_id)
            row = await conn.fetchrow(query, tenant_id, role_id, permissions)
            if row is None:
                if create:
                    raise already_exists(ErrorReason.ROLE_ALREADY_EXISTS, role_id)
                raise not_found(ErrorReason.ROLE_NOT_FOUND, role_id)
            await self._audit.record(conn, action, f"roles/{role_id}", {"permissions": permissions})
        await records.publish(self._cache, tenant)
        return _role(row)

    async def _page(self, size: int, page_token: str, query: str, key: str) -> tuple[list[Row], str, bool]:
        """One page of the tenant's rows of ``query``, in ``key`` order: (rows, next page's token, first page?)."""
        size = page_size(size)
        tenant_id = context.current_tenant()
        listed = {"list": key}
        position = self._tokens.decode(page_token, tenant_id, listed)
        after = str(position.get("after", "")) if position else ""
        async with self._db.transaction(readonly=True) as conn:
            rows = await conn.fetch(query, tenant_id, after, size + 1)
        following = self._tokens.encode(tenant_id, listed, {"after": rows[size - 1][key]}) if len(rows) > size else ""
        return rows[:size], following, position is None

    async def _check_permissions(self, v: Violations, tenant_id: str, permissions: list[str]) -> None:
        """INVALID_ARGUMENT for what no tenant may hold, then FEATURE_NOT_IN_PLAN for what its plan lacks."""
        if not permissions:
            v.add("role.permissions", "must name at least one permission")
        for permission in ungrantable(permissions):
            v.add("role.permissions", f"{permission!r} is not a permission a tenant's role can hold")
        v.raise_if_any()
        found = entitlements.current() or await self._entitlements.get(tenant_id)
        features = found.features if found is not None else frozenset()
        for permission, feature in sorted(needs_feature(permissions, features).items()):
            plan, why = (found.plan, found.feature(feature)[1]) if found is not None else ("", entitlements.NOT_IN_PLAN)
            raise permission_denied(
                f"{permission!r} needs feature {feature!r}, which tenant {tenant_id!r}'s plan {plan!r} does not "
                "include; upgrade the plan or leave the permission out",
                ErrorReason.FEATURE_NOT_IN_PLAN,
                feature=feature,
                plan=plan,
                decided_by=why,
            )

    async def _limit(self, tenant_id: str, name: str) -> int:
        found = entitlements.current() or await self._entitlements.get(tenant_id)
        return found.limit(name) if found is not None else UNLIMITED


async def _check_role(conn: Conn, tenant_id: str, field: str, role: str) -> None:
    if not await user_records.role_exists(conn, tenant_id, role):
        known = ", ".join(TENANT_ROLES)
        problem = f"{role!r} is neither a built-in role ({known}) nor one of the tenant's custom roles"
        raise invalid_argument([FieldViolation(field, problem)])


def _check_user_id(user_id: str, field: str = "user_id") -> None:
    if not user_id:
        raise invalid_argument([FieldViolation(field, "is required")])


def _check_mask(paths: Any, only: str) -> None:
    bad = [p for p in paths if p not in (only, "*")]
    if bad:
        raise invalid_argument(
            [FieldViolation("update_mask", f"{p!r} cannot be updated; only {only!r} can") for p in bad],
            reason=ErrorReason.INVALID_UPDATE_MASK,
        )


def _role(row: Mapping[str, Any] | Row) -> pb.Role:
    return pb.Role(role_id=row["role_id"], permissions=list(row["permissions"]))
