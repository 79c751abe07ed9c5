"""towerco.tenant.v1.TenantRegistryService: onboarding, lifecycle, settings, branding."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from contextlib import nullcontext
from typing import Any

import asyncpg
import grpc
from google.api import httpbody_pb2
from grpc import aio
from towerco.tenant.v1 import tenant_registry_service_pb2 as pb
from towerco.tenant.v1 import tenant_registry_service_pb2_grpc as pb_grpc

from services.runtime import cells, context, idempotency
from services.runtime.canary import CANARY_TENANTS
from services.runtime.db import savepoint
from services.runtime.errors import (
    ErrorReason,
    FieldViolation,
    already_exists,
    failed_precondition,
    invalid_argument,
    not_found,
    unauthenticated,
    unavailable,
)
from services.runtime.faults import InjectedFaultError
from services.runtime.field_behavior import ignored_on_create
from services.runtime.ids import TENANT_ID
from services.runtime.pagination import page_size
from services.runtime.scope import require_platform_admin, target_tenant
from services.runtime.server import Runtime
from services.runtime.validation import Violations

from . import branding, hosts, queries, records, tenant_settings_rules, tenant_settings_store, user_records
from .custom_domains import CustomDomains
from .offboarding import Offboarding
from .secrets import SecretBox
from .tenant_data_migration import MigrationRunner
from .tenant_move import TenantMover

State = pb.Tenant.State
Ctx = aio.ServicerContext[Any, Any]

ADMIN_ROLE = "admin"
#: What GetBrandingStylesheet answers, and the gateway serves as /branding.css.
STYLESHEET_TYPE = "text/css; charset=utf-8"
#: Fields CreateTenant ignores (OUTPUT_ONLY, IDENTIFIER): they must not make a retry look like a different request.
CREATE_IGNORES = ignored_on_create(pb.CreateTenantRequest.DESCRIPTOR, "tenant")
GONE = records.GONE

#: Steps after the first transaction of provisioning, each idempotent, run in order with
#: the caller's context; the tenant becomes ACTIVE only once all of them have succeeded.
ProvisioningStep = Callable[[pb.Tenant], Awaitable[None]]


class TenantRegistryServicer(pb_grpc.TenantRegistryServiceServicer):
    def __init__(
        self,
        runtime: Runtime,
        box: SecretBox,
        migrations: MigrationRunner,
        offboarding: Offboarding,
        mover: TenantMover,
        domains: CustomDomains,
    ) -> None:
        self._db = runtime.db
        self._window = runtime.settings.idempotency_window_seconds
        self._cache = runtime.cache
        self._tenants = runtime.tenants
        self._tokens = runtime.page_tokens
        self._faults = runtime.faults
        self._base_domain = runtime.settings.base_domain
        self._box = box
        self._migrations = migrations
        self._offboarding = offboarding
        self._mover = mover
        self._domains = domains
        self._audit = runtime.audit
        self._plans = runtime.plans
        self._entitlements = runtime.entitlements
        self._cells = runtime.settings.cells
        self.provisioning_steps: list[ProvisioningStep] = []

    # Tenants and provisioning

    async def CreateTenant(self, request: pb.CreateTenantRequest, ctx: Ctx) -> pb.Tenant:
        require_platform_admin()
        self._check_create(request)
        tenant_id = request.tenant_id
        with context.platform_scope(tenant_id, "tenants.create"):
            row = await self._create_or_replay(request)
            if row["state"] != "STATE_PROVISIONING":
                return await self._present(row)
            await records.publish(self._cache, row)
            try:
                self._faults.check("provision.after_commit")
                tenant = records.tenant_from_row(row)
                for step in self.provisioning_steps:
                    await step(tenant)
            except (InjectedFaultError, grpc.aio.AioRpcError, OSError) as exc:
                raise unavailable(
                    f"tenant {tenant_id!r} was created but is not active yet ({_short(exc)}); "
                    "retry CreateTenant with the same request_id to finish provisioning",
                    ErrorReason.PROVISIONING_INCOMPLETE,
                    retry_after_seconds=1.0,
                ) from None
            async with self._db.transaction() as conn:
                current = await conn.fetchrow(queries.GET_TENANT_FOR_UPDATE, tenant_id)
                assert current is not None, "created above in this tenant's scope"
                if current["state"] == "STATE_PROVISIONING":
                    current = await conn.fetchrow(queries.SET_STATE, tenant_id, "STATE_ACTIVE", "")
            assert current is not None
            await records.publish(self._cache, current)
            return self._show_cell(records.tenant_from_row(current), current)

    def _check_create(self, request: pb.CreateTenantRequest) -> None:
        v = Violations()
        tenant_id = request.tenant_id
        v.identifier("tenant_id", tenant_id, TENANT_ID)
        if tenant_id in hosts.RESERVED_TENANT_IDS:
            v.add("tenant_id", f"{tenant_id!r} is reserved for the platform; choose another id")
        if not request.HasField("tenant"):
            v.add("tenant", "is required")
        tenant = request.tenant
        v.text("tenant.display_name", tenant.display_name, max_len=100, required=True)
        if not tenant.plan:
            v.add("tenant.plan", "is required")
        elif self._plans.get(tenant.plan) is None:
            v.add("tenant.plan", f"must be one of {', '.join(self._plans.names)}")
        if not tenant.admin_email:
            v.add("tenant.admin_email", "is required")
        elif len(tenant.admin_email) > user_records.MAX_EMAIL or not user_records.EMAIL.fullmatch(tenant.admin_email):
            v.add("tenant.admin_email", "must be an e-mail address of at most 254 characters")
        if len(tenant.domains) > hosts.MAX_DOMAINS:
            v.add("tenant.domains", f"must have at most {hosts.MAX_DOMAINS} entries")
        seen: set[str] = set()
        for i, domain in enumerate(tenant.domains):
            problem = hosts.domain_problem(domain, self._base_domain)
            if problem:
                v.add(f"tenant.domains[{i}]", problem)
            elif domain in seen:
                v.add(f"tenant.domains[{i}]", "is listed twice")
            seen.add(domain)
        self._check_placement(v, request)
        idempotency.check_request_id(v, request.request_id)
        v.raise_if_any()

    def _check_placement(self, v: Violations, request: pb.CreateTenantRequest) -> None:
        """An explicit cell must be one of ``CELLS``, and a dedicated one only for a plan that may have it."""
        if request.cell:
            problem = cells.placement_problem(self._cells, request.cell, request.tenant.plan, self._plans)
            if problem:
                v.add("cell", problem)

    async def _placement(self, request: pb.CreateTenantRequest) -> str:
        """The cell a new tenant goes to: the one asked for, else the shared cell with the most room."""
        if request.cell or len(self._cells) == 1:
            return request.cell or self._cells[0].name
        async with self._db.platform_read("tenants.placement") as conn:
            rows = await conn.fetch(queries.TENANTS_PER_CELL, self._cells[0].name)
        return cells.roomiest(self._cells, {row["cell"]: row["tenants"] for row in rows})

    def _show_cell(self, tenant: pb.Tenant, row: Mapping[str, Any]) -> pb.Tenant:
        """Platform admins see where the tenant's data lives; its own users do not (the platform's layout).

        A platform of one cell places no one: the record shows no cell there.
        """
        caller = context.current_caller()
        if len(self._cells) > 1 and caller is not None and caller.is_platform_admin:
            tenant.cell = row["cell"] or self._cells[0].name
        return tenant

    async def _create_or_replay(self, request: pb.CreateTenantRequest) -> Mapping[str, Any]:
        """The first transaction: tenant, hosts, default settings and admin user, or the replay."""
        tenant_id, tenant = request.tenant_id, request.tenant
        request_hash = idempotency.request_hash(request, CREATE_IGNORES)
        cell = await self._placement(request)
        for _ in range(2):  # a concurrent create of the same id: the second pass sees it
            try:
                async with self._db.transaction() as conn:
                    row = await conn.fetchrow(queries.GET_TENANT_FOR_UPDATE, tenant_id)
                    if row is not None:
                        expired = row["state"] != "STATE_PROVISIONING" and await conn.fetchval(
                            queries.REQUEST_EXPIRED, row["create_time"], self._window
                        )
                        return _replayed(row, request, request_hash, expired=expired)
                    await conn.execute(
                        queries.INSERT_TENANT,
                        tenant_id,
                        tenant.display_name.strip(),
                        tenant.plan,
                        tenant.admin_email,
                        request.request_id or None,
                        request_hash,
                        cell,
                    )
                    for domain in tenant.domains:
                        try:
                            async with savepoint(conn):
                                await conn.execute(queries.INSERT_HOST, tenant_id, domain)
                        except asyncpg.UniqueViolationError:
                            raise already_exists(ErrorReason.DOMAIN_ALREADY_EXISTS, domain) from None
                    defaults = tenant_settings_rules.default_settings(tenant_id, tenant.display_name.strip())
                    document = tenant_settings_store.to_document(defaults, self._box, tenant_id, None)
                    await conn.execute(queries.INSERT_SETTINGS, tenant_id, document)
                    # Its administrator is its first user, by UserService's rules (a seat of max_users).
                    admin_email = user_records.normalise_email(tenant.admin_email)
                    admin_id = user_records.new_user_id()
                    await conn.execute(queries.INSERT_USER, tenant_id, admin_id, admin_email, ADMIN_ROLE)
                    await self._audit.record(
                        conn,
                        "tenants.create",
                        f"tenants/{tenant_id}",
                        {"plan": tenant.plan, "domains": list(tenant.domains)},
                    )
                    created: Mapping[str, Any] | None = await conn.fetchrow(queries.GET_TENANT, tenant_id)
                    assert created is not None
                    return created
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name != "tenants_pkey":
                    raise
        raise already_exists(ErrorReason.TENANT_ALREADY_EXISTS, tenant_id)

    async def GetTenant(self, request: pb.GetTenantRequest, ctx: Ctx) -> pb.Tenant:
        tenant_id = target_tenant(request.tenant_id)
        with context.platform_scope(tenant_id, "tenants.get") if _foreign(tenant_id) else nullcontext():
            async with self._db.transaction(readonly=True) as conn:
                row = await conn.fetchrow(queries.GET_TENANT, tenant_id)
        if row is None:
            raise not_found(ErrorReason.TENANT_NOT_FOUND, tenant_id)
        return await self._present(row)

    async def ListTenants(self, request: pb.ListTenantsRequest, ctx: Ctx) -> pb.ListTenantsResponse:
        require_platform_admin()
        size = page_size(request.page_size)
        query = {"show_deleted": request.show_deleted}
        own = context.current_tenant()
        position = self._tokens.decode(request.page_token, own, query)
        after = str(position.get("after", "")) if position else ""
        async with self._db.platform_read("tenants.list") as conn:
            # The isolation canaries are the platform's instruments, not tenants anyone serves.
            rows = await conn.fetch(queries.LIST_TENANTS, after, request.show_deleted, size + 1, CANARY_TENANTS)
        response = pb.ListTenantsResponse(tenants=await asyncio.gather(*(self._present(r) for r in rows[:size])))
        if len(rows) > size:
            response.next_page_token = self._tokens.encode(own, query, {"after": rows[size - 1]["tenant_id"]})
        return response

    async def _present(self, row: Mapping[str, Any]) -> pb.Tenant:
        """A tenant as the API shows it: its plan is the feature gate's current one."""
        tenant = self._show_cell(records.tenant_from_row(row), row)
        if row["state"] not in GONE:
            record = await self._entitlements.record(row["tenant_id"])
            if record is not None:
                tenant.plan = record.plan
        return tenant

    # Lifecycle

    async def SuspendTenant(self, request: pb.SuspendTenantRequest, ctx: Ctx) -> pb.Tenant:
        v = Violations()
        v.text("reason", request.reason, max_len=500, required=True, multiline=True)
        tenant_id = self._lifecycle_target(request.tenant_id, v)
        row = await self._transition(
            tenant_id, {"STATE_ACTIVE"}, "STATE_SUSPENDED", request.reason.strip(), "tenants.suspend"
        )
        return await self._present(row)

    async def ReactivateTenant(self, request: pb.ReactivateTenantRequest, ctx: Ctx) -> pb.Tenant:
        tenant_id = self._lifecycle_target(request.tenant_id, Violations())
        row = await self._transition(tenant_id, {"STATE_SUSPENDED"}, "STATE_ACTIVE", "", "tenants.reactivate")
        return await self._present(row)

    async def DeleteTenant(self, request: pb.DeleteTenantRequest, ctx: Ctx) -> pb.Tenant:
        tenant_id = self._lifecycle_target(request.tenant_id, Violations())
        allowed = {"STATE_PROVISIONING", "STATE_ACTIVE", "STATE_SUSPENDED"}
        row = await self._transition(tenant_id, allowed, "STATE_DELETING", "", "tenants.delete")
        self._offboarding.start(tenant_id)
        return await self._present(row)

    async def SetLegalHold(self, request: pb.SetLegalHoldRequest, ctx: Ctx) -> pb.Tenant:
        v = Violations()
        v.text("reason", request.reason, max_len=500, required=request.hold, multiline=True)
        tenant_id = self._lifecycle_target(request.tenant_id, v)
        reason = request.reason.strip()
        with context.platform_scope(tenant_id, "tenants.set_legal_hold"):
            async with self._db.transaction() as conn:
                row = await records.lock_live_tenant(
                    conn, tenant_id, ": its audit log goes with it, there is nothing to hold"
                )
                if row["legal_hold"] == request.hold:  # idempotent: the same state again records nothing
                    return await self._present(row)
                updated = await conn.fetchrow(
                    queries.SET_LEGAL_HOLD, tenant_id, request.hold, reason if request.hold else ""
                )
                details = {"legal_hold": request.hold, **({"reason": reason} if reason else {})}
                await self._audit.record(conn, "tenants.set_legal_hold", f"tenants/{tenant_id}", details)
            assert updated is not None
            await records.publish(self._cache, updated)
        return await self._present(updated)

    def _lifecycle_target(self, requested: str, v: Violations) -> str:
        require_platform_admin()
        if not requested:
            v.add("tenant_id", "is required: lifecycle changes name the tenant explicitly")
        elif not context.is_valid_tenant_id(requested):
            v.add("tenant_id", TENANT_ID.problem)
        elif requested == context.PLATFORM_TENANT:
            v.add("tenant_id", "the platform's own tenant cannot be suspended, reactivated or deleted")
        elif requested in CANARY_TENANTS:
            v.add("tenant_id", "the isolation canary's tenants cannot be suspended, reactivated or deleted")
        v.raise_if_any()
        return target_tenant(requested)

    async def _transition(
        self, tenant_id: str, allowed: set[str], new_state: str, reason: str, action: str
    ) -> Mapping[str, Any]:
        with context.platform_scope(tenant_id, f"tenants.{new_state.lower()}"):
            async with self._db.transaction() as conn:
                row = await conn.fetchrow(queries.GET_TENANT_FOR_UPDATE, tenant_id)
                if row is None:
                    raise not_found(ErrorReason.TENANT_NOT_FOUND, tenant_id)
                if row["state"] not in allowed:
                    raise failed_precondition(
                        f"tenant {tenant_id!r} is {State.Name(State.Value(row['state']))}; this change needs "
                        + " or ".join(sorted(allowed)),
                        ErrorReason.TENANT_STATE_CONFLICT,
                        state=row["state"],
                    )
                updated: Mapping[str, Any] | None = await conn.fetchrow(queries.SET_STATE, tenant_id, new_state, reason)
                details = {"from": row["state"], "to": new_state, **({"reason": reason} if reason else {})}
                await self._audit.record(conn, action, f"tenants/{tenant_id}", details)
            assert updated is not None
            await records.publish(self._cache, updated)
            return updated

    # Host names

    async def ResolveTenant(self, request: pb.ResolveTenantRequest, ctx: Ctx) -> pb.ResolveTenantResponse:
        host = _host(request.host, "host")
        tenant_id = await self._resolve(host)
        if tenant_id is None:
            raise not_found(ErrorReason.HOST_NOT_FOUND, host)
        return pb.ResolveTenantResponse(tenant_id=tenant_id)

    async def AddCustomDomain(self, request: pb.AddCustomDomainRequest, ctx: Ctx) -> pb.Tenant:
        return await self._present(await self._domains.add(request.tenant_id, request.domain))

    async def RemoveCustomDomain(self, request: pb.RemoveCustomDomainRequest, ctx: Ctx) -> pb.Tenant:
        return await self._present(await self._domains.remove(request.tenant_id, request.domain))

    async def _resolve(self, host: str) -> str | None:
        """The serving tenant of ``host`` if it is active or suspended."""
        tenant_id = hosts.subdomain_tenant(host, self._base_domain)
        if tenant_id is None:
            async with self._db.platform_read("hosts.resolve") as conn:
                tenant_id = await conn.fetchval(queries.FIND_HOST, host)
        if tenant_id is None:
            return None
        return tenant_id if await self._serves(tenant_id) else None

    async def _serves(self, tenant_id: str) -> bool:
        if tenant_id in CANARY_TENANTS:  # kept SUSPENDED for the canary, never a sign-in page
            return False
        info = await self._tenants.get(tenant_id)
        return info is not None and info.state in (State.STATE_ACTIVE, State.STATE_SUSPENDED)

    # Settings and branding

    async def GetTenantSettings(self, request: pb.GetTenantSettingsRequest, ctx: Ctx) -> pb.TenantSettings:
        tenant_id = target_tenant(request.tenant_id)
        item = await records.read_settings(self._db, self._cache, tenant_id)
        if item.value is None:
            raise not_found(ErrorReason.TENANT_NOT_FOUND, tenant_id)
        settings = records.settings_from_value(item.value)
        settings.tenant_id = tenant_id
        return settings

    async def UpdateTenantSettings(self, request: pb.UpdateTenantSettingsRequest, ctx: Ctx) -> pb.TenantSettings:
        tenant_id = target_tenant(request.settings.tenant_id, "settings.tenant_id")
        paths = tenant_settings_rules.mask_paths(request.update_mask)
        v = Violations()
        tenant_settings_rules.validate(request.settings, paths, v)
        v.raise_if_any()  # what is wrong whatever is stored: refused before touching the database
        themed = branding.touched(paths)
        plan = await branding.entitled(self._entitlements, tenant_id) if themed else None
        with context.platform_scope(tenant_id, "settings.update") if _foreign(tenant_id) else nullcontext():
            async with self._db.transaction() as conn:
                # Offboarding removes the settings; writing them would bring a row back.
                row = await records.lock_live_tenant(conn, tenant_id, "; its settings can no longer change")
                previous = await conn.fetchval(queries.GET_SETTINGS_FOR_UPDATE, tenant_id)
                stored = (
                    tenant_settings_store.from_document(previous, tenant_id)
                    if previous is not None
                    else tenant_settings_rules.default_settings(tenant_id, row["display_name"])
                )
                # Rules across fields (a port without any host, a kept secret never stored) need the stored values.
                tenant_settings_rules.validate(request.settings, paths, v, stored=stored)
                v.raise_if_any()
                merged = tenant_settings_rules.merge(stored, request.settings, paths)
                if themed:  # a theme the plan lacks is refused before anything is written
                    branding.check_update(tenant_id, plan, stored.branding, merged.branding)
                document = tenant_settings_store.to_document(merged, self._box, tenant_id, previous)
                await conn.execute(queries.UPSERT_SETTINGS, tenant_id, document)
                await conn.execute(queries.BUMP_VERSION, tenant_id)
                # The fields changed, never their values: some of them are secrets.
                await self._audit.record(
                    conn, "settings.update", f"tenants/{tenant_id}/settings", {"fields": sorted(paths)}
                )
                row = await conn.fetchrow(queries.GET_TENANT, tenant_id)
            assert row is not None
            await records.publish(self._cache, row, document)
        settings = tenant_settings_store.from_document(document, tenant_id)
        settings.tenant_id = tenant_id
        return settings

    async def GetBranding(self, request: pb.GetBrandingRequest, ctx: Ctx) -> pb.Branding:
        if bool(request.host) == bool(request.tenant_id):
            raise invalid_argument(
                [
                    FieldViolation("host", "set exactly one of host and tenant_id"),
                    FieldViolation("tenant_id", "set exactly one of host and tenant_id"),
                ],
                reason=ErrorReason.EXACTLY_ONE_REQUIRED,
            )
        if request.host:
            host = _host(request.host, "host")
            tenant_id = await self._resolve(host)
            if tenant_id is None:
                raise not_found(ErrorReason.HOST_NOT_FOUND, host)
        else:
            tenant_id = request.tenant_id
            if not context.is_valid_tenant_id(tenant_id):
                raise invalid_argument([FieldViolation("tenant_id", TENANT_ID.problem)])
            if not await self._serves(tenant_id):
                raise not_found(ErrorReason.TENANT_NOT_FOUND, tenant_id)
        return await self._served_branding(tenant_id)

    async def _served_branding(self, tenant_id: str) -> pb.Branding:
        """The branding a serving tenant's pages show: the platform's theme unless its plan has its own."""
        item = await records.read_settings(self._db, self._cache, tenant_id)
        if item.value is None:
            raise not_found(ErrorReason.TENANT_NOT_FOUND, tenant_id)
        stored = branding.from_cached(item.value)
        # A theme the plan lacks is kept, but not served until the plan has it again.
        shown = branding.served(stored, await branding.entitled(self._entitlements, tenant_id))
        shown.display_name = str(item.value["display_name"])
        return shown

    async def GetBrandingStylesheet(self, request: pb.GetBrandingStylesheetRequest, ctx: Ctx) -> httpbody_pb2.HttpBody:
        """GetBranding's ``custom_css`` of the host's tenant as ``text/css`` (GET /branding.css
        at the gateway), so the page applies it as a stylesheet of its own origin."""
        current = context.current()
        if current is None or current.tenant_id is None:
            raise unauthenticated(
                "no tenant: ask for the stylesheet on the tenant's host", ErrorReason.TENANT_NOT_IDENTIFIED
            )
        shown = await self.GetBranding(pb.GetBrandingRequest(tenant_id=current.tenant_id), ctx)
        return httpbody_pb2.HttpBody(content_type=STYLESHEET_TYPE, data=shown.custom_css.encode())

    # Migrations

    async def MigrateTenantData(self, request: pb.MigrateTenantDataRequest, ctx: Ctx) -> pb.Migration:
        require_platform_admin()
        return await self._migrations.submit(request)

    async def GetMigration(self, request: pb.GetMigrationRequest, ctx: Ctx) -> pb.Migration:
        require_platform_admin()
        return await self._migrations.get(request.migration_id)

    # Moves between cells

    async def MoveTenant(self, request: pb.MoveTenantRequest, ctx: Ctx) -> pb.TenantMove:
        require_platform_admin()
        return await self._mover.submit(request)

    async def GetMove(self, request: pb.GetMoveRequest, ctx: Ctx) -> pb.TenantMove:
        require_platform_admin()
        return await self._mover.get(request.move_id)


def _foreign(tenant_id: str) -> bool:
    return tenant_id != context.current_tenant()


def _host(value: str, field: str) -> str:
    host = hosts.normalize(value) if value else None
    if host is None:
        why = "is required" if not value else "must be a host name such as tenant_a.example.com (a :port is ignored)"
        raise invalid_argument([FieldViolation(field, why)])
    return host


def _replayed(
    row: Mapping[str, Any], request: pb.CreateTenantRequest, request_hash: str, *, expired: bool
) -> Mapping[str, Any]:
    """The tenant a retry of its create gets; ALREADY_EXISTS for any other create, or past the window."""
    if not request.request_id or row["request_id"] != request.request_id or expired:
        raise already_exists(ErrorReason.TENANT_ALREADY_EXISTS, request.tenant_id)
    idempotency.check_same_request(row["request_hash"], request_hash, "create request")
    return row


def _short(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)[:200]
