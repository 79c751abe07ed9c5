"""Single sign-on configurations: SsoConfigService for tenant admins, and the issuer directory
(towerco.internal.v1.SsoIssuerDirectoryService) the services verify tenant tokens with.

A change bumps the tenant's version and is published on the tenant cache's channel with
the new configuration (kind ``sso``), so every process stops honouring an old issuer at
its next call (services/runtime/sso_issuers.py).
"""

from __future__ import annotations

import json
import re
from typing import Any

import asyncpg
from grpc import aio
from towerco.internal.v1 import sso_issuers_pb2 as internal_pb
from towerco.internal.v1 import sso_issuers_pb2_grpc as internal_grpc
from towerco.tenant.v1 import sso_config_service_pb2 as pb
from towerco.tenant.v1 import sso_config_service_pb2_grpc as pb_grpc

from services.runtime import context
from services.runtime.audit import Auditor
from services.runtime.auth import TenantIssuer
from services.runtime.db import Database
from services.runtime.entitlements import EntitlementDirectory
from services.runtime.errors import (
    ErrorReason,
    FieldViolation,
    ServiceError,
    already_exists,
    failed_precondition,
    invalid_argument,
    not_found,
)
from services.runtime.ids import ROLE_ID, TENANT_ID
from services.runtime.oidc import ProviderError, check_url
from services.runtime.plans import UNLIMITED
from services.runtime.roles import ROLE_PERMISSIONS, TENANT_ROLES
from services.runtime.server import Runtime
from services.runtime.sso_issuers import SSO_KIND, sso_value
from services.runtime.tenant_cache import TenantCache, Versioned
from services.runtime.tenants import STATE_KIND
from services.runtime.validation import Violations

from . import queries, records, user_records
from .records import state_value

Ctx = aio.ServicerContext[Any, Any]

MAX_GROUPS = 50
ROLE_RULE = f"must be a built-in tenant role ({', '.join(TENANT_ROLES)}) or one of the tenant's custom roles"


def _role_like(role: str) -> bool:
    """A built-in tenant role, or a name a custom role may have (never platform_admin)."""
    return role in TENANT_ROLES or (ROLE_ID.matches(role) and role not in ROLE_PERMISSIONS)


async def _check_custom_roles(conn: asyncpg.Connection[Any], wanted: TenantIssuer) -> None:
    """INVALID_ARGUMENT naming each mapped role the tenant does not have (a custom role not created)."""
    v = Violations()
    for index, (_, role) in enumerate(wanted.group_roles):
        if not await user_records.role_exists(conn, wanted.tenant_id, role):
            v.add(f"sso_config.group_roles[{index}].role", f"{role!r}: {ROLE_RULE}")
    v.raise_if_any()


_CLAIM = re.compile(r"^[A-Za-z0-9_:./-]{1,64}$")

COLUMNS = "tenant_id, issuer, audience, email_claim, groups_claim, group_roles, update_time"
GET = f"SELECT {COLUMNS} FROM tenant.tenant_sso WHERE tenant_id = $1"
FIND_ISSUER = f"SELECT {COLUMNS} FROM tenant.tenant_sso WHERE issuer = $1"
UPSERT = f"""
INSERT INTO tenant.tenant_sso (tenant_id, issuer, audience, email_claim, groups_claim, group_roles)
VALUES ($1, $2, $3, $4, $5, $6::jsonb)
ON CONFLICT (tenant_id) DO UPDATE SET issuer = $2, audience = $3, email_claim = $4, groups_claim = $5,
    group_roles = $6::jsonb, update_time = now()
RETURNING {COLUMNS}
"""
DELETE = "DELETE FROM tenant.tenant_sso WHERE tenant_id = $1 RETURNING issuer"
VERSION = "SELECT version FROM tenant.tenants WHERE tenant_id = $1"

#: The gRPC services of this module, for the registry's ServiceSpec.
SERVICES = (
    pb.DESCRIPTOR.services_by_name["SsoConfigService"],
    internal_pb.DESCRIPTOR.services_by_name["SsoIssuerDirectoryService"],
)


def register(server: aio.Server, runtime: Runtime) -> None:
    pb_grpc.add_SsoConfigServiceServicer_to_server(SsoConfigServicer(runtime.db, runtime.cache, runtime.audit), server)
    directory = SsoIssuerDirectoryServicer(runtime.db, runtime.cache, runtime.audit, runtime.entitlements)
    internal_grpc.add_SsoIssuerDirectoryServiceServicer_to_server(directory, server)


def issuer_from_row(row: Any) -> TenantIssuer:
    pairs = row["group_roles"]
    pairs = json.loads(pairs) if isinstance(pairs, str) else pairs
    return TenantIssuer(
        tenant_id=row["tenant_id"],
        issuer=row["issuer"],
        audience=row["audience"],
        email_claim=row["email_claim"],
        groups_claim=row["groups_claim"],
        group_roles=tuple((str(group), str(role)) for group, role in pairs),
    )


def config_from_row(row: Any) -> pb.SsoConfig:
    found = issuer_from_row(row)
    config = pb.SsoConfig(
        tenant_id=found.tenant_id,
        issuer=found.issuer,
        audience=found.audience,
        email_claim=found.email_claim,
        groups_claim=found.groups_claim,
        group_roles=[pb.GroupRole(group=group, role=role) for group, role in found.group_roles],
    )
    config.update_time.FromDatetime(row["update_time"])
    return config


def validated(config: pb.SsoConfig) -> TenantIssuer:
    """The request's configuration, or INVALID_ARGUMENT naming every bad field."""
    v = Violations()
    v.text("sso_config.issuer", config.issuer, max_len=512, required=True)
    if config.issuer:
        try:
            check_url(config.issuer)
        except ProviderError as exc:
            v.add("sso_config.issuer", str(exc))
    v.text("sso_config.audience", config.audience, max_len=256, required=True)
    for name in ("email_claim", "groups_claim"):
        value = getattr(config, name)
        if value and not _CLAIM.fullmatch(value):
            v.add(f"sso_config.{name}", "must be a claim name: 1 to 64 of A-Z a-z 0-9 _ : . / -")
    if not config.group_roles:
        v.add("sso_config.group_roles", "at least one group must give a role")
    elif len(config.group_roles) > MAX_GROUPS:
        v.add("sso_config.group_roles", f"at most {MAX_GROUPS} groups")
    seen: set[str] = set()
    for index, pair in enumerate(config.group_roles[:MAX_GROUPS]):
        field = f"sso_config.group_roles[{index}]"
        v.text(f"{field}.group", pair.group, max_len=256, required=True)
        if pair.group in seen:
            v.add(f"{field}.group", f"group {pair.group!r} is mapped twice")
        seen.add(pair.group)
        if not _role_like(pair.role):
            v.add(f"{field}.role", ROLE_RULE)
    v.raise_if_any()
    return TenantIssuer(
        tenant_id=context.current_tenant(),
        issuer=config.issuer,
        audience=config.audience,
        email_claim=config.email_claim or "email",
        groups_claim=config.groups_claim or "groups",
        group_roles=tuple((pair.group, pair.role) for pair in config.group_roles),
    )


class SsoConfigServicer(pb_grpc.SsoConfigServiceServicer):
    def __init__(self, db: Database, cache: TenantCache, audit: Auditor) -> None:
        self._db = db
        self._cache = cache
        self._audit = audit

    async def GetSsoConfig(self, request: pb.GetSsoConfigRequest, ctx: Ctx) -> pb.SsoConfig:
        tenant_id = context.current_tenant()
        async with self._db.transaction(readonly=True) as conn:
            row = await conn.fetchrow(GET, tenant_id)
        if row is None:
            raise not_found(ErrorReason.SSO_CONFIG_NOT_FOUND, tenant_id)
        return config_from_row(row)

    async def UpdateSsoConfig(self, request: pb.UpdateSsoConfigRequest, ctx: Ctx) -> pb.SsoConfig:
        wanted = validated(request.sso_config)
        tenant_id = wanted.tenant_id
        async with self._db.transaction() as conn:
            tenant = await conn.fetchrow(queries.GET_TENANT_FOR_UPDATE, tenant_id)
            if tenant is None:
                raise not_found(ErrorReason.TENANT_NOT_FOUND, tenant_id)
            await _check_custom_roles(conn, wanted)
            try:  # the issuer's uniqueness is platform-wide: only the index sees other tenants' rows
                row = await conn.fetchrow(
                    UPSERT, tenant_id, wanted.issuer, wanted.audience, wanted.email_claim, wanted.groups_claim,
                    json.dumps([list(pair) for pair in wanted.group_roles]),
                )  # fmt: skip
            except asyncpg.UniqueViolationError:
                raise already_exists(ErrorReason.SSO_ISSUER_ALREADY_EXISTS, wanted.issuer) from None
            await self._audit.record(
                conn, "sso.update", f"tenants/{tenant_id}/sso",
                {"issuer": wanted.issuer, "audience": wanted.audience, "email_claim": wanted.email_claim,
                 "groups_claim": wanted.groups_claim, "group_roles": [list(p) for p in wanted.group_roles]},
            )  # fmt: skip
            tenant = await self._bump(conn, tenant_id)
        await self._publish(tenant, wanted)
        return config_from_row(row)

    async def DeleteSsoConfig(self, request: pb.DeleteSsoConfigRequest, ctx: Ctx) -> pb.DeleteSsoConfigResponse:
        tenant_id = context.current_tenant()
        async with self._db.transaction() as conn:
            await conn.fetchrow(queries.GET_TENANT_FOR_UPDATE, tenant_id)
            issuer = await conn.fetchval(DELETE, tenant_id)
            if issuer is None:
                raise not_found(ErrorReason.SSO_CONFIG_NOT_FOUND, tenant_id)
            await self._audit.record(conn, "sso.delete", f"tenants/{tenant_id}/sso", {"issuer": issuer})
            tenant = await self._bump(conn, tenant_id)
        await self._publish(tenant, None)
        return pb.DeleteSsoConfigResponse()

    async def _bump(self, conn: asyncpg.Connection[Any], tenant_id: str) -> Any:
        await conn.execute(queries.BUMP_VERSION, tenant_id)
        return await conn.fetchrow(queries.GET_TENANT, tenant_id)

    async def _publish(self, tenant: Any, config: TenantIssuer | None) -> None:
        values = {STATE_KIND: state_value(tenant), SSO_KIND: sso_value(config)}
        await self._cache.publish(tenant["tenant_id"], tenant["version"], values)


class SsoIssuerDirectoryServicer(internal_grpc.SsoIssuerDirectoryServiceServicer):
    def __init__(self, db: Database, cache: TenantCache, audit: Auditor, entitlements: EntitlementDirectory) -> None:
        self._db = db
        self._cache = cache
        self._audit = audit
        self._entitlements = entitlements

    async def SignInSsoUser(self, request: internal_pb.SignInSsoUserRequest, ctx: Ctx) -> internal_pb.SsoUser:
        tenant_id, email, role = request.tenant_id, user_records.normalise_email(request.email), request.role
        v = Violations()
        if not context.is_valid_tenant_id(tenant_id):
            v.add("tenant_id", TENANT_ID.problem)
        user_records.check_email(v, "email", email)
        if not _role_like(role):
            v.add("role", ROLE_RULE)
        v.raise_if_any()
        with context.platform_scope(tenant_id, "sso.sign-in"):
            found = await self._entitlements.get(tenant_id)
            max_users = found.limit("max_users") if found is not None else UNLIMITED
            row = tenant = None
            for attempt in range(2):
                try:
                    row, tenant = await self._sign_in(tenant_id, request.issuer, email, role, max_users)
                    break
                except ServiceError as exc:
                    # Two first sign-ins of one email at once: the second finds the first's user.
                    if exc.reason != "USER_ALREADY_EXISTS" or attempt:
                        raise
            if tenant is not None:
                await records.publish(self._cache, tenant)
        assert row is not None
        return internal_pb.SsoUser(user_id=row["user_id"], role=row["role"])

    async def _sign_in(self, tenant_id: str, issuer: str, email: str, role: str, max_users: int) -> tuple[Any, Any]:
        """(the user's row, the tenant's row to publish if the users changed, else None)."""
        async with self._db.transaction() as conn:
            config = await conn.fetchrow(GET, tenant_id)
            if config is None or config["issuer"] != issuer:
                raise failed_precondition(
                    f"tenant {tenant_id!r} no longer signs in with issuer {issuer!r}; sign in again",
                    ErrorReason.SSO_ISSUER_CHANGED,
                )
            if not await user_records.role_exists(conn, tenant_id, role):  # a custom role deleted since
                raise not_found(ErrorReason.ROLE_NOT_FOUND, role)
            row = await user_records.user_by_email(conn, tenant_id, email)
            if row is None:  # the first sign-in: a seat within max_users, or nothing at all
                return await user_records.create_user(conn, self._audit, tenant_id, email, role, max_users)
            if row["role"] == role:
                return row, None
            user_id = row["user_id"]  # the groups changed: the role follows them
            tenant = await user_records.lock_users(conn, tenant_id)
            changed = await conn.fetchrow(queries.SET_USER_ROLE, tenant_id, user_id, role)
            await self._audit.record(conn, "users.update", f"users/{user_id}", {"role": role, "by": "sso"})
            return changed, tenant

    async def LookupSsoIssuer(self, request: internal_pb.LookupSsoIssuerRequest, ctx: Ctx) -> internal_pb.SsoIssuer:
        if not request.issuer or len(request.issuer) > 512:
            raise invalid_argument([FieldViolation("issuer", "must be 1 to 512 characters")])
        async with self._db.platform_read("sso.lookup") as conn:
            row = await conn.fetchrow(FIND_ISSUER, request.issuer)
        if row is None:
            raise not_found(ErrorReason.SSO_CONFIG_NOT_FOUND, request.issuer)
        return _reply(issuer_from_row(row), 0)

    async def GetTenantSso(self, request: internal_pb.GetTenantSsoRequest, ctx: Ctx) -> internal_pb.SsoIssuer:
        found = await tenant_sso(self._db, request.tenant_id)
        if found.version == 0:
            raise not_found(ErrorReason.TENANT_NOT_FOUND, request.tenant_id)
        value = found.value
        reply = internal_pb.SsoIssuer(tenant_id=request.tenant_id, version=found.version)
        if value is not None:
            reply.MergeFrom(_reply(issuer_from_row({"tenant_id": request.tenant_id, **value}), found.version))
        return reply


async def tenant_sso(db: Database, tenant_id: str) -> Versioned:
    """A tenant's configuration at its version (version 0: no such tenant)."""
    if not context.is_valid_tenant_id(tenant_id):
        raise invalid_argument([FieldViolation("tenant_id", TENANT_ID.problem)])
    with context.system_scope(tenant_id, "sso"):
        async with db.transaction(readonly=True) as conn:
            version = await conn.fetchval(VERSION, tenant_id)
            row = await conn.fetchrow(GET, tenant_id) if version else None
    if not version:
        return Versioned(0, None)
    return Versioned(version, None if row is None else sso_value(issuer_from_row(row)))


def _reply(found: TenantIssuer, version: int) -> internal_pb.SsoIssuer:
    return internal_pb.SsoIssuer(
        tenant_id=found.tenant_id,
        issuer=found.issuer,
        audience=found.audience,
        email_claim=found.email_claim,
        groups_claim=found.groups_claim,
        group_roles=[internal_pb.SsoGroupRole(group=group, role=role) for group, role in found.group_roles],
        version=version,
    )
