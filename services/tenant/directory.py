"""towerco.internal.v1.TenantDirectoryService: tenant state for the other services."""

from __future__ import annotations

from typing import Any

from grpc import aio
from towerco.internal.v1 import tenant_data_pb2 as internal_pb
from towerco.internal.v1 import tenant_data_pb2_grpc as internal_grpc

from services.runtime import context
from services.runtime.errors import FieldViolation, invalid_argument, not_found
from services.runtime.tenants import State, StateSource


class TenantDirectoryServicer(internal_grpc.TenantDirectoryServiceServicer):
    def __init__(self, source: StateSource) -> None:
        self._source = source

    async def GetTenantState(
        self, request: internal_pb.GetTenantStateRequest, ctx: aio.ServicerContext[Any, Any]
    ) -> internal_pb.TenantState:
        if not context.is_valid_tenant_id(request.tenant_id):
            raise invalid_argument([FieldViolation("tenant_id", "must match ^[a-z][a-z0-9_-]{2,49}$")])
        # Straight from the database: the caller asks because its caches could not answer.
        item = await self._source(request.tenant_id)
        if item.value is None:
            raise not_found("tenant", request.tenant_id)
        return internal_pb.TenantState(
            tenant_id=request.tenant_id,
            state=State.Value(str(item.value["state"])),
            plan=str(item.value["plan"]),
            version=item.version,
        )
