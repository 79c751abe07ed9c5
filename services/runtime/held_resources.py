"""What a tenant holds now (its sites, its users), counted by the service that owns it.

Point-in-time usage is not metered: the owner counts its own rows when asked. Both ends
of ``towerco.internal.v1.HeldResourcesService`` are written once here: the owner serves
:class:`HeldResourcesServicer` with the SQL that counts each resource it owns, and the
feature gate asks through :class:`HeldResourceCounts` (GetUsage, CheckLimit).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import grpc
from grpc import aio
from towerco.internal.v1 import held_resources_pb2 as pb
from towerco.internal.v1 import held_resources_pb2_grpc as pb_grpc

from . import context
from .errors import ErrorReason, ServiceError, unavailable
from .identity import ServiceIdentity
from .ids import TENANT_ID
from .lookups import InternalLookup
from .server import Runtime
from .validation import Violations

log = logging.getLogger("towerco.usage")

Ctx = aio.ServicerContext[Any, Any]

#: Which service owns (and counts) each held resource a plan limits.
OWNERS: Mapping[str, str] = {"max_sites": "sites", "max_users": "tenant"}


class HeldResourcesServicer(pb_grpc.HeldResourcesServiceServicer):
    """The owner's side: ``counts`` maps a limit name to the SQL counting it (``$1``: the tenant)."""

    def __init__(self, runtime: Runtime, counts: Mapping[str, str]) -> None:
        self._db = runtime.db
        self._counts = dict(counts)

    async def GetHeldResources(self, request: pb.GetHeldResourcesRequest, ctx: Ctx) -> pb.HeldResources:
        v = Violations()
        v.identifier("tenant_id", request.tenant_id, TENANT_ID)
        v.raise_if_any()
        held: dict[str, int] = {}
        with context.platform_scope(request.tenant_id, "count held resources"):
            async with self._db.transaction(readonly=True) as conn:
                for name, sql in self._counts.items():
                    held[name] = await conn.fetchval(sql, request.tenant_id)
        return pb.HeldResources(tenant_id=request.tenant_id, held=held)


class HeldResourceCounts:
    """The asking side: one internal channel per owner, called as this service."""

    def __init__(self, targets: Mapping[str, str], identity: ServiceIdentity, timeout: float = 2.0) -> None:
        self._lookups = {owner: InternalLookup(targets[owner], identity, timeout) for owner in set(OWNERS.values())}
        self._stubs = {owner: pb_grpc.HeldResourcesServiceStub(one.channel) for owner, one in self._lookups.items()}

    async def count(self, tenant_id: str, resources: tuple[str, ...]) -> dict[str, int]:
        """How many of each of ``resources`` (held ones only) the tenant holds now."""
        owners = sorted({OWNERS[r] for r in resources if r in OWNERS})
        replies = await asyncio.gather(*(self._ask(owner, tenant_id) for owner in owners))
        held: dict[str, int] = {}
        for reply in replies:
            held.update(reply.held)
        return {r: held.get(r, 0) for r in resources if r in OWNERS}

    async def _ask(self, owner: str, tenant_id: str) -> pb.HeldResources:
        request = pb.GetHeldResourcesRequest(tenant_id=tenant_id)
        try:
            reply = await self._lookups[owner].ask(self._stubs[owner].GetHeldResources, request)
        except grpc.aio.AioRpcError as exc:
            raise _unavailable(owner, exc) from None
        return reply if reply is not None else pb.HeldResources(tenant_id=tenant_id)

    async def close(self) -> None:
        for lookup in self._lookups.values():
            await lookup.close()


def _unavailable(owner: str, exc: grpc.aio.AioRpcError) -> ServiceError:
    log.warning("cannot count held resources at the %s service: %s %s", owner, exc.code().name, exc.details())
    return unavailable(
        f"what the tenant holds cannot be counted just now (the {owner} service did not answer); retry shortly",
        ErrorReason.USAGE_UNAVAILABLE,
    )
