"""towerco.internal.v1.TenantDirectoryService: tenant state for the other services."""

from __future__ import annotations

from typing import Any

from grpc import aio
from towerco.internal.v1 import tenant_data_pb2 as internal_pb
from towerco.internal.v1 import tenant_data_pb2_grpc as internal_grpc

from services.runtime import lookups
from services.runtime.tenants import State, StateSource


class TenantDirectoryServicer(internal_grpc.TenantDirectoryServiceServicer):
    def __init__(self, source: StateSource) -> None:
        self._source = source

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
