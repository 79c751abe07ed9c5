"""towerco.internal.v1.TenantEntitlementsService: records for the other services."""

from __future__ import annotations

from typing import Any

from grpc import aio
from towerco.internal.v1 import entitlements_pb2 as internal_pb
from towerco.internal.v1 import entitlements_pb2_grpc as internal_grpc

from services.runtime import context, lookups
from services.runtime.entitlements import EntitlementDirectory, Record, RecordSource
from services.runtime.ids import TENANT_ID
from services.runtime.plans import Plans
from services.runtime.server import Runtime
from services.runtime.validation import Violations

from . import queries, records

Ctx = aio.ServicerContext[Any, Any]


class TenantEntitlementsServicer(internal_grpc.TenantEntitlementsServiceServicer):
    def __init__(self, runtime: Runtime, source: RecordSource) -> None:
        self._db = runtime.db
        self._plans: Plans = runtime.plans
        self._entitlements: EntitlementDirectory = runtime.entitlements
        self._source = source

    async def RegisterTenant(
        self, request: internal_pb.RegisterTenantRequest, ctx: Ctx
    ) -> internal_pb.TenantEntitlements:
        v = Violations()
        v.identifier("tenant_id", request.tenant_id, TENANT_ID)
        if self._plans.get(request.plan) is None:
            v.add("plan", f"must be one of {', '.join(self._plans.names)}")
        v.raise_if_any()
        tenant_id = request.tenant_id
        with context.platform_scope(tenant_id, "features.register"):
            async with self._db.transaction() as conn:
                inserted = await conn.fetchval(queries.REGISTER, tenant_id, request.plan)
                found = await records.load(conn, tenant_id)
            assert found is not None, "registered above or earlier"
            version, record = found
            if inserted is not None:
                await self._entitlements.publish(tenant_id, version, record)
        return record.to_proto(tenant_id, version)

    async def GetTenantEntitlements(
        self, request: internal_pb.GetTenantEntitlementsRequest, ctx: Ctx
    ) -> internal_pb.TenantEntitlements:
        version, value = await lookups.answer(self._source, request.tenant_id)
        return Record.from_value(value).to_proto(request.tenant_id, version)
