"""towerco.internal.v1.TenantDirectoryService: tenant state for the other services."""

from __future__ import annotations

from typing import Any

from grpc import aio
from towerco.internal.v1 import tenant_data_pb2 as internal_pb
from towerco.internal.v1 import tenant_data_pb2_grpc as internal_grpc

from services.runtime import context, lookups
from services.runtime.errors import ErrorReason, FieldViolation, invalid_argument, not_found
from services.runtime.ids import TENANT_ID
from services.runtime.tenants import State, StateSource
from services.runtime.user_access import UserAccess, UserSource

from .custom_domains import CustomDomains


class TenantDirectoryServicer(internal_grpc.TenantDirectoryServiceServicer):
    def __init__(self, source: StateSource, users: UserSource, domains: CustomDomains) -> None:
        self._source = source
        self._users = users
        self._domains = domains

    async def GetTenantState(
        self, request: internal_pb.GetTenantStateRequest, ctx: aio.ServicerContext[Any, Any]
    ) -> internal_pb.TenantState:
        version, value = await lookups.answer(self._source, request.tenant_id)
        return internal_pb.TenantState(
            tenant_id=request.tenant_id,
            state=State.Value(str(value["state"])),
            plan=str(value["plan"]),
            version=version,
            legal_hold=bool(value.get("legal_hold")),
            cell=str(value.get("cell") or ""),
        )

    async def GetUserAccess(
        self, request: internal_pb.GetUserAccessRequest, ctx: aio.ServicerContext[Any, Any]
    ) -> internal_pb.UserAccess:
        if not context.is_valid_tenant_id(request.tenant_id):
            raise invalid_argument([FieldViolation("tenant_id", TENANT_ID.problem)])
        if not request.user_id:
            raise invalid_argument([FieldViolation("user_id", "is required")])
        item = await self._users(request.tenant_id, request.user_id)
        if item.version == 0:
            raise not_found(ErrorReason.TENANT_NOT_FOUND, request.tenant_id)
        access = UserAccess.from_value(item.value)
        if access is None:
            return internal_pb.UserAccess(version=item.version, known=False)
        return internal_pb.UserAccess(
            version=item.version,
            known=True,
            active=access.active,
            role=access.role,
            permissions=sorted(access.permissions),
        )

    async def ListCustomDomains(
        self, request: internal_pb.ListCustomDomainsRequest, ctx: aio.ServicerContext[Any, Any]
    ) -> internal_pb.ListCustomDomainsResponse:
        return await self._domains.list(request)
