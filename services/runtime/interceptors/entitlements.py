"""Entitlements link: what the calling tenant's plan allows, and how much at once.

:class:`EntitlementsInterceptor` finds the tenant's entitlements (in memory, almost
always), refuses a method whose declared ``feature`` the tenant lacks, and bounds the
tenant's database connections for the call. How fast the tenant may call is the next
link's (``rate_limit.py``), which reads the entitlements bound here.

Calls of platform admins and platform services, and public calls, pass untouched: the
limits are a tenant's, and the platform's own work must not be throttled by them.
"""

from __future__ import annotations

from typing import Any

from grpc import aio

from .. import bulkhead, context, entitlements
from ..entitlements import EntitlementDirectory
from ..errors import ErrorReason, ServiceError, permission_denied, unavailable
from ..policy import Policy, PolicyTable
from .base import Behavior, Metadata, PolicyInterceptor


class EntitlementsInterceptor(PolicyInterceptor):
    """PERMISSION_DENIED without the method's feature (FEATURE_NOT_IN_PLAN, or
    FEATURE_WITHHELD_BY_OVERRIDE); binds the bulkhead limit."""

    def __init__(self, policies: PolicyTable, directory: EntitlementDirectory) -> None:
        super().__init__(policies)
        self._directory = directory

    def wrap(self, inner: Behavior, policy: Policy, metadata: Metadata) -> Behavior:
        if policy.public:
            return inner

        async def behavior(request: Any, ctx: aio.ServicerContext[Any, Any]) -> Any:
            tenant_id = context.tenant_user_call()
            if tenant_id is None:
                return await inner(request, ctx)
            found = await tenant_entitlements(self._directory, tenant_id)
            if policy.feature:
                if policy.feature not in found.features:
                    raise found.refused(policy.feature)
            with entitlements.bound(found), bulkhead.limited(found.limit("db_concurrency")):
                return await inner(request, ctx)

        return behavior


async def tenant_entitlements(directory: EntitlementDirectory, tenant_id: str) -> entitlements.Entitlements:
    """The tenant's entitlements; UNAVAILABLE when they cannot be read, PERMISSION_DENIED if unknown."""
    try:
        found = await directory.get(tenant_id)
    except ServiceError:
        raise
    except Exception:
        raise unavailable(
            "the tenant's entitlements cannot be read right now; retry shortly", ErrorReason.ENTITLEMENTS_UNAVAILABLE
        ) from None
    if found is None:
        raise permission_denied(f"tenant {tenant_id!r} is not known to the platform", ErrorReason.TENANT_UNKNOWN)
    return found
