"""Tenant link: decide which tenant the call acts on, once, before any handler runs.

``x-tenant-id`` (set by the gateway from the subdomain) wins when present, else the
token's ``tenant_id``. Both present and different is a cross-tenant attempt, unless a
platform admin calls an RPC that administers other tenants: the call stays bound to the
caller's own tenant, with the named one kept as ``foreign_tenant``, and is refused by
:class:`~.cross_tenant.CrossTenantInterceptor` once the caller's tenant passed its checks.
"""

from __future__ import annotations

from typing import Any

from grpc import aio

from .. import context, metrics, tracing
from ..errors import ErrorReason, FieldViolation, invalid_argument, unauthenticated
from ..ids import TENANT_ID
from ..policy import Policy
from .base import Behavior, Metadata, PolicyInterceptor


class TenantInterceptor(PolicyInterceptor):
    """Binds the call's tenant into the request context."""

    reads_metadata = True

    def wrap(self, inner: Behavior, policy: Policy, metadata: Metadata) -> Behavior:
        async def behavior(request: Any, ctx: aio.ServicerContext[Any, Any]) -> Any:
            current = context.current()
            assert current is not None, "RequestContextInterceptor must run first"
            header = metadata.single("x-tenant-id")
            tenant_id = resolve_tenant(policy, current.caller, header)
            if tenant_id is None:
                return await inner(request, ctx)
            tracing.tag_tenant(tenant_id)
            metrics.note_tenant(tenant_id, by_platform=current.caller is not None and current.caller.is_platform)
            foreign = header if header is not None and header != tenant_id else None
            with context.bind(context.derive(current, tenant_id=tenant_id, foreign_tenant=foreign)):
                return await inner(request, ctx)

        return behavior


def resolve_tenant(policy: Policy, caller: context.Caller | None, header: str | None) -> str | None:
    """The tenant a call acts on; None only for public calls that name no tenant.

    For a cross-tenant attempt that is the caller's own tenant: the attempt is refused
    further down the chain, not here.
    """
    if header is not None and not context.is_valid_tenant_id(header):
        raise invalid_argument(
            [FieldViolation("metadata.x-tenant-id", TENANT_ID.problem)],
            reason=ErrorReason.TENANT_ID_INVALID,
        )
    if caller is None:
        if policy.public:
            return header
        raise unauthenticated("tenant not identified", ErrorReason.TENANT_NOT_IDENTIFIED)
    if header is None or header == caller.tenant_id:
        return caller.tenant_id
    if caller.is_platform_admin and policy.cross_tenant:
        return header
    return caller.tenant_id
