"""What every service knows about the tenants it serves: their state, plan, legal hold and cell.

Read through :class:`~services.runtime.tenant_cache.TenantCache`; on a miss the registry
answers (its own database in the registry process, its internal
``TenantDirectoryService`` everywhere else, called with this service's identity).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from towerco.internal.v1 import tenant_data_pb2, tenant_data_pb2_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb

from .context import CANARY_TENANTS, PLATFORM_TENANT
from .errors import ErrorReason, ServiceError, unavailable
from .identity import ServiceIdentity
from .lookups import InternalLookup
from .tenant_cache import TenantCache, Versioned
from .user_access import UserDirectory, UserSource

STATE_KIND = "state"
#: Tenant ids the registry never holds.
RESERVED_TENANTS = frozenset((*CANARY_TENANTS, PLATFORM_TENANT))
State = tenant_pb.Tenant.State

#: Reads a tenant's state from the source of truth: version 0 and no value if it is unknown.
StateSource = Callable[[str], Awaitable[Versioned]]


@dataclass(frozen=True)
class TenantInfo:
    tenant_id: str
    state: int
    plan: str
    version: int
    #: Under legal hold (SetLegalHold): the audit retention job purges none of its events.
    legal_hold: bool = False
    #: The database cell holding its rows (``services/runtime/cells.py``); "": the home cell.
    cell: str = ""

    @classmethod
    def from_value(cls, tenant_id: str, item: Versioned) -> TenantInfo | None:
        """A cached state as TenantInfo; None for an unknown tenant."""
        value = item.value
        if value is None:
            return None
        state = State.Value(str(value["state"]))
        # A value cached before the flag (or the cell) existed has none: not held, in the home cell.
        held, cell = bool(value.get("legal_hold")), str(value.get("cell") or "")
        return cls(tenant_id, state, str(value["plan"]), item.version, held, cell)

    def as_value(self) -> dict[str, str | int | bool]:
        return {
            "state": State.Name(State.ValueType(self.state)),
            "plan": self.plan,
            "legal_hold": self.legal_hold,
            "cell": self.cell,
        }


class TenantDirectory:
    """Tenant state and plan, from memory whenever possible."""

    def __init__(self, cache: TenantCache, source: StateSource, users: UserSource | None = None) -> None:
        self._cache = cache
        self._source = source
        #: Per tenant: the cached value last read, and what it says (made again only when it changes).
        self._read: dict[str, tuple[Versioned, TenantInfo | None]] = {}
        #: Registry users' state and role, through the same cache and change notices.
        self.users = UserDirectory(cache, users) if users is not None else None

    async def get(self, tenant_id: str) -> TenantInfo | None:
        item = await self._cache.get(tenant_id, STATE_KIND, lambda: self._source(tenant_id))
        read = self._read.get(tenant_id)
        if read is not None and read[0] is item:
            return read[1]
        info = TenantInfo.from_value(tenant_id, item)
        self._read[tenant_id] = (item, info)
        return info

    async def answer(self, tenant_id: str) -> TenantInfo | None:
        """:meth:`get` for a call: the registry out of reach is UNAVAILABLE (retry), not an internal error."""
        try:
            return await self.get(tenant_id)
        except ServiceError:
            raise
        except Exception:
            raise unavailable(
                "the tenant registry cannot be reached to check this tenant; retry shortly",
                ErrorReason.TENANT_DIRECTORY_UNAVAILABLE,
            ) from None

    async def cell_of(self, tenant_id: str) -> str:
        """The cell holding the tenant's rows ("" for the home cell, and for a tenant no one created).

        The platform's reserved tenants (the canaries, ``platform``) are in no registry: the
        paths acting as them choose their cell (``cells.on_cell``), else it is the home cell.
        """
        if tenant_id in RESERVED_TENANTS:
            return ""
        info = await self.answer(tenant_id)
        return info.cell if info is not None else ""


class RegistryStateSource(InternalLookup):
    """Asks the tenant registry, as this service (the caller's token may not allow it)."""

    def __init__(self, target: str, identity: ServiceIdentity, timeout: float = 2.0) -> None:
        super().__init__(target, identity, timeout)
        self._stub = tenant_data_pb2_grpc.TenantDirectoryServiceStub(self.channel)

    async def __call__(self, tenant_id: str) -> Versioned:
        request = tenant_data_pb2.GetTenantStateRequest(tenant_id=tenant_id)
        reply = await self.ask(self._stub.GetTenantState, request)
        if reply is None:
            return Versioned(0, None)
        info = TenantInfo(reply.tenant_id, reply.state, reply.plan, reply.version, reply.legal_hold, reply.cell)
        return Versioned(reply.version, dict(info.as_value()))
