"""What every service knows about the tenants it serves: their state and plan.

Read through :class:`~services.runtime.tenant_cache.TenantCache`; on a miss the registry
answers (its own database in the registry process, its internal
``TenantDirectoryService`` everywhere else, called with this service's identity).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from towerco.internal.v1 import tenant_data_pb2, tenant_data_pb2_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb

from .channels import service_channel
from .identity import ServiceIdentity
from .tenant_cache import TenantCache, Versioned

STATE_KIND = "state"
State = tenant_pb.Tenant.State

#: Reads a tenant's state from the source of truth: version 0 and no value if it is unknown.
StateSource = Callable[[str], Awaitable[Versioned]]


@dataclass(frozen=True)
class TenantInfo:
    tenant_id: str
    state: int
    plan: str
    version: int

    def as_value(self) -> dict[str, str | int]:
        return {"state": State.Name(State.ValueType(self.state)), "plan": self.plan}


class TenantDirectory:
    """Tenant state and plan, from memory whenever possible."""

    def __init__(self, cache: TenantCache, source: StateSource) -> None:
        self._cache = cache
        self._source = source

    async def get(self, tenant_id: str) -> TenantInfo | None:
        item = await self._cache.get(tenant_id, STATE_KIND, lambda: self._source(tenant_id))
        if item.value is None:
            return None
        return TenantInfo(tenant_id, State.Value(str(item.value["state"])), str(item.value["plan"]), item.version)


class RegistryStateSource:
    """Asks the tenant registry, as this service (the caller's token may not allow it)."""

    def __init__(self, target: str, identity: ServiceIdentity, timeout: float = 2.0) -> None:
        self._channel = service_channel(target, identity=identity)
        self._stub = tenant_data_pb2_grpc.TenantDirectoryServiceStub(self._channel)
        self._timeout = timeout

    async def __call__(self, tenant_id: str) -> Versioned:
        try:
            reply = await self._stub.GetTenantState(
                tenant_data_pb2.GetTenantStateRequest(tenant_id=tenant_id), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return Versioned(0, None)
            raise
        info = TenantInfo(reply.tenant_id, reply.state, reply.plan, reply.version)
        return Versioned(reply.version, dict(info.as_value()))

    async def close(self) -> None:
        await self._channel.close(None)
