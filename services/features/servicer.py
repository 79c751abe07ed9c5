"""towerco.features.v1.FeatureGateService: plans, entitlements and per-tenant overrides."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC
from typing import Any, TypeAlias

import asyncpg
from grpc import aio
from towerco.features.v1 import feature_gate_service_pb2 as pb
from towerco.features.v1 import feature_gate_service_pb2_grpc as pb_grpc

from services.runtime import context
from services.runtime.entitlements import Entitlements, evaluate
from services.runtime.errors import ErrorReason, FieldViolation, invalid_argument, not_found
from services.runtime.held_resources import HeldResourceCounts
from services.runtime.plans import FEATURE_PATTERN, LIMITS, UNLIMITED
from services.runtime.scope import require_platform_admin, target_tenant
from services.runtime.server import Runtime
from services.runtime.tenants import State
from services.runtime.validation import Violations

from . import queries, records
from .usage_reports import UsageReports
from .usage_window import Window, checked_window

Ctx = aio.ServicerContext[Any, Any]
Conn: TypeAlias = "asyncpg.Connection[Any]"
#: Changes one tenant's stored record in an open transaction, given its current plan;
#: returns the audit event's details, or None when there was nothing to change.
Change = Callable[[Conn, str], Awaitable[dict[str, Any] | None]]

_GONE = (State.STATE_DELETING, State.STATE_DELETED)


class FeatureGateServicer(pb_grpc.FeatureGateServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._db = runtime.db
        self._plans = runtime.plans
        self._tenants = runtime.tenants
        self._entitlements = runtime.entitlements
        self._audit = runtime.audit
        held = HeldResourceCounts(runtime.settings.targets, runtime.identity)
        runtime.on_stop(held.close)
        self._usage = UsageReports(runtime.db, runtime.entitlements, held, runtime.page_tokens)
        # The plans never change while the process runs: the answer is built once.
        self._plan_list = pb.ListPlansResponse(
            plans=[
                pb.Plan(name=p.name, features=sorted(p.features), limits=dict(p.limits)) for p in self._plans.ordered
            ]
        )

    # Reads

    async def GetEntitlements(self, request: pb.GetEntitlementsRequest, ctx: Ctx) -> pb.Entitlements:
        return _to_pb(await self._entitlements_of(target_tenant(request.tenant_id)))

    async def HasFeature(self, request: pb.HasFeatureRequest, ctx: Ctx) -> pb.HasFeatureResponse:
        tenant_id = target_tenant(request.tenant_id)
        _check_feature(request.feature)
        enabled, reason = (await self._entitlements_of(tenant_id)).feature(request.feature)
        return pb.HasFeatureResponse(enabled=enabled, reason=reason)

    async def CheckLimit(self, request: pb.CheckLimitRequest, ctx: Ctx) -> pb.CheckLimitResponse:
        tenant_id = target_tenant(request.tenant_id)
        v = Violations()
        _check_resource(v, request.resource)
        if request.current_usage < 0:  # refused as before it was deprecated, so old clients see no change
            v.add("current_usage", "must be 0 or more")
        v.raise_if_any()
        # Otherwise current_usage is ignored: the platform's own count decides.
        return await self._usage.check_limit(await self._entitlements_of(tenant_id), request.resource)

    async def GetUsage(self, request: pb.GetUsageRequest, ctx: Ctx) -> pb.Usage:
        tenant_id = target_tenant(request.tenant_id)
        window = _window(request)
        info = await self._tenants.get(tenant_id)
        if info is None:
            raise not_found(ErrorReason.TENANT_NOT_FOUND, tenant_id)
        # A deleted tenant's usage is kept (billing needs it); it holds nothing any more.
        found = None if info.state in _GONE else await self._entitlements_of(tenant_id)
        return await self._usage.usage(tenant_id, window, found)

    async def ListTenantUsage(self, request: pb.ListTenantUsageRequest, ctx: Ctx) -> pb.ListTenantUsageResponse:
        require_platform_admin()
        return await self._usage.tenant_usage(_window(request), request.page_size, request.page_token)

    async def ListPlans(self, request: pb.ListPlansRequest, ctx: Ctx) -> pb.ListPlansResponse:
        return self._plan_list

    # Changes (platform admins)

    async def SetTenantPlan(self, request: pb.SetTenantPlanRequest, ctx: Ctx) -> pb.Entitlements:
        require_platform_admin()
        tenant_id = target_tenant(request.tenant_id, required=True)
        if self._plans.get(request.plan) is None:
            raise invalid_argument([FieldViolation("plan", f"must be one of {', '.join(self._plans.names)}")])

        async def change(conn: Conn, current_plan: str) -> dict[str, Any] | None:
            if current_plan == request.plan:
                return None
            await conn.execute(queries.SET_PLAN, tenant_id, request.plan)
            return {"plan": request.plan, "previous_plan": current_plan}

        return await self._change(tenant_id, "features.set_plan", change)

    async def SetFeatureOverride(self, request: pb.SetFeatureOverrideRequest, ctx: Ctx) -> pb.Entitlements:
        require_platform_admin()
        tenant_id = target_tenant(request.tenant_id, required=True)
        _check_feature(request.feature)
        expire = request.expire_time.ToDatetime(UTC) if request.HasField("expire_time") else None
        if expire is not None and expire.timestamp() <= time.time():
            raise invalid_argument([FieldViolation("expire_time", "must be in the future (or unset for never)")])

        async def change(conn: Conn, current_plan: str) -> dict[str, Any] | None:
            existing = await conn.fetchrow(queries.GET_FEATURE_OVERRIDE, tenant_id, request.feature)
            if existing is not None and (existing["enabled"], existing["expire_time"]) == (request.enabled, expire):
                return None
            await conn.execute(queries.UPSERT_FEATURE_OVERRIDE, tenant_id, request.feature, request.enabled, expire)
            return {
                "feature": request.feature,
                "enabled": request.enabled,
                "expire_time": expire.isoformat() if expire else "",
            }

        return await self._change(tenant_id, "features.set_feature_override", change)

    async def SetLimitOverride(self, request: pb.SetLimitOverrideRequest, ctx: Ctx) -> pb.Entitlements:
        require_platform_admin()
        tenant_id = target_tenant(request.tenant_id, required=True)
        v = Violations()
        _check_resource(v, request.resource)
        if request.limit < UNLIMITED:
            v.add("limit", "must be 0 or more, or -1 for unlimited")
        v.raise_if_any()

        async def change(conn: Conn, current_plan: str) -> dict[str, Any] | None:
            existing = await conn.fetchval(queries.GET_LIMIT_OVERRIDE, tenant_id, request.resource)
            if existing == request.limit:
                return None
            await conn.execute(queries.UPSERT_LIMIT_OVERRIDE, tenant_id, request.resource, request.limit)
            return {"resource": request.resource, "limit": request.limit}

        return await self._change(tenant_id, "features.set_limit_override", change)

    async def ClearFeatureOverride(self, request: pb.ClearFeatureOverrideRequest, ctx: Ctx) -> pb.Entitlements:
        require_platform_admin()
        tenant_id = target_tenant(request.tenant_id, required=True)
        _check_feature(request.feature)

        async def change(conn: Conn, current_plan: str) -> dict[str, Any] | None:
            removed = await conn.fetchrow(queries.DELETE_FEATURE_OVERRIDE, tenant_id, request.feature)
            if removed is None:
                return None
            expire = removed["expire_time"]
            return {
                "feature": request.feature,
                "previous_enabled": removed["enabled"],
                "previous_expire_time": expire.isoformat() if expire else "",
            }

        return await self._change(tenant_id, "features.clear_feature_override", change)

    async def ClearLimitOverride(self, request: pb.ClearLimitOverrideRequest, ctx: Ctx) -> pb.Entitlements:
        require_platform_admin()
        tenant_id = target_tenant(request.tenant_id, required=True)
        v = Violations()
        _check_resource(v, request.resource)
        v.raise_if_any()

        async def change(conn: Conn, current_plan: str) -> dict[str, Any] | None:
            removed = await conn.fetchval(queries.DELETE_LIMIT_OVERRIDE, tenant_id, request.resource)
            if removed is None:
                return None
            return {"resource": request.resource, "previous_limit": removed}

        return await self._change(tenant_id, "features.clear_limit_override", change)

    # Shared

    async def _known_plan(self, tenant_id: str) -> str:
        """The registry's plan of a tenant that exists and is not deleted; NOT_FOUND otherwise."""
        info = await self._tenants.get(tenant_id)
        if info is None or info.state in _GONE:
            raise not_found(ErrorReason.TENANT_NOT_FOUND, tenant_id)
        return info.plan

    async def _entitlements_of(self, tenant_id: str) -> Entitlements:
        await self._known_plan(tenant_id)
        found = await self._entitlements.get(tenant_id)
        if found is None:
            raise not_found(ErrorReason.TENANT_NOT_FOUND, tenant_id)
        return found

    async def _change(self, tenant_id: str, action: str, change: Change) -> pb.Entitlements:
        """One transaction: lock (or register) the tenant's row, change, bump, audit; then publish."""
        registry_plan = await self._known_plan(tenant_id)
        with context.platform_scope(tenant_id, action):
            async with self._db.transaction() as conn:
                await conn.execute(queries.REGISTER, tenant_id, registry_plan)
                current_plan = await conn.fetchval(queries.LOCK_PLAN, tenant_id)
                details = await change(conn, current_plan)
                if details is not None:
                    await conn.execute(queries.BUMP_VERSION, tenant_id)
                    await self._audit.record(conn, action, f"tenants/{tenant_id}/entitlements", details)
                found = await records.load(conn, tenant_id)
            assert found is not None, "registered above in this transaction"
            version, record = found
            if details is not None:
                await self._entitlements.publish(tenant_id, version, record)
        return _to_pb(evaluate(self._plans, tenant_id, record))


def _check_feature(feature: str) -> None:
    if not FEATURE_PATTERN.fullmatch(feature):
        raise invalid_argument([FieldViolation("feature", f"must match {FEATURE_PATTERN.pattern}")])


def _check_resource(v: Violations, resource: str) -> None:
    if resource not in LIMITS:
        v.add("resource", f"must be one of {', '.join(LIMITS)}")


def _window(request: pb.GetUsageRequest | pb.ListTenantUsageRequest) -> Window:
    v = Violations()
    present = (request.HasField("start_time"), request.HasField("end_time"))
    window = checked_window(v, request.start_time, request.end_time, present=present)
    if isinstance(request, pb.ListTenantUsageRequest) and request.page_size < 0:
        v.add("page_size", "must not be negative")
    v.raise_if_any()
    assert window is not None, "no violation means a window"
    return window


def _to_pb(found: Entitlements) -> pb.Entitlements:
    return pb.Entitlements(
        tenant_id=found.tenant_id, plan=found.plan, features=sorted(found.features), limits=dict(found.limits)
    )
