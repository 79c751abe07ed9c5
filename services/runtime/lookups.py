"""Per-tenant lookups between services: a cache misses, the owner of the data answers.

Both ends are written once here. The asking side, :class:`InternalLookup`, calls the
owner's internal contract as this service (its own identity, never the caller's token)
and reads NOT_FOUND as "no such tenant" (version 0, no value), which caches keep like any
other answer. The answering side, :func:`answer`, checks the id and reads the owner's own
source straight from its database, since the asker's caches could not help.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from . import context
from .channels import service_channel
from .errors import ErrorReason, FieldViolation, invalid_argument, not_found
from .identity import ServiceIdentity
from .ids import TENANT_ID
from .tenant_cache import Versioned

Reply = TypeVar("Reply")
#: Reads one tenant's value from the owner's database: version 0 and no value if unknown.
Source = Callable[[str], Awaitable[Versioned]]


class InternalLookup:
    """A channel to another service's internal lookup, called as this service."""

    def __init__(self, target: str, identity: ServiceIdentity, timeout: float) -> None:
        self.channel = service_channel(target, identity=identity)
        self._timeout = timeout

    async def ask(self, method: Callable[..., Awaitable[Reply]], request: Any) -> Reply | None:
        """The owner's reply, or None when it answers NOT_FOUND."""
        try:
            return await method(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    async def close(self) -> None:
        await self.channel.close(None)


async def answer(source: Source, tenant_id: str) -> tuple[int, dict[str, Any]]:
    """The owner's side: the tenant's version and value; INVALID_ARGUMENT for a bad id, NOT_FOUND if unknown."""
    if not context.is_valid_tenant_id(tenant_id):
        raise invalid_argument([FieldViolation("tenant_id", TENANT_ID.problem)])
    item = await source(tenant_id)
    if item.value is None:
        raise not_found(ErrorReason.TENANT_NOT_FOUND, tenant_id)
    return item.version, item.value
