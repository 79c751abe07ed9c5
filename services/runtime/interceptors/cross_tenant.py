"""Cross-tenant link: a call naming a tenant its caller may not act on is refused here.

The tenant link bound such a call to the caller's own tenant and kept the named one as
``foreign_tenant``; the tenant-state link has checked the caller's tenant since, so a
suspended tenant's users are turned away as such. Here the attempt is counted against the
caller's own ``rpm_read`` (refusals are cheap reads, but not free: past the rate they are
RATE_LIMITED and not audited), then refused with CROSS_TENANT_DENIED and handed to the
error link for the audit log, which tallies repeats (``services/runtime/refusal_audit.py``).
"""

from __future__ import annotations

from typing import Any

from grpc import aio

from .. import context, metrics
from ..entitlements import EntitlementDirectory
from ..policy import Policy, PolicyTable
from ..ratelimit import RateLimiter
from ..scope import cross_tenant_denied
from .base import Behavior, Metadata, PolicyInterceptor
from .entitlements import tenant_entitlements
from .rate_limit import admit


class CrossTenantInterceptor(PolicyInterceptor):
    """PERMISSION_DENIED (CROSS_TENANT_DENIED) for a foreign ``x-tenant-id``, within the caller's read rate."""

    def __init__(self, policies: PolicyTable, directory: EntitlementDirectory, limiter: RateLimiter) -> None:
        super().__init__(policies)
        self._directory = directory
        self._limiter = limiter

    def wrap(self, inner: Behavior, policy: Policy, metadata: Metadata) -> Behavior:
        async def behavior(request: Any, ctx: aio.ServicerContext[Any, Any]) -> Any:
            current = context.current()
            if current is None or current.foreign_tenant is None or current.caller is None:
                return await inner(request, ctx)
            own = context.tenant_user_call()  # None for the platform's callers: no tenant's rate
            if own is not None:
                await admit(self._limiter, own, "read", await tenant_entitlements(self._directory, own))
            metrics.active().cross_tenant_refusal(current.foreign_tenant)
            raise cross_tenant_denied(current.caller.tenant_id, current.foreign_tenant)

        return behavior
