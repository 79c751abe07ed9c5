"""Usage link: each call of an active tenant's user counted for billing, with how it ended.

A call counts once its tenant is known and active (after the tenant-state link), refused
or not: as a read or a write (the method's ``rate_class``); refused by the rate limiter
or by the plan or a quota (the error's reason, ``usage.REFUSALS``) it counts as that
refusal too, otherwise as a use of the method's gated ``feature`` if it names one. Calls
of platform admins and platform services, public calls, and calls refused before the
tenant was checked (no token, a suspended tenant) are not any tenant's usage. The counts
are kept in memory (``services/runtime/usage.py``): no round trip on the call.
"""

from __future__ import annotations

from typing import Any

from grpc import aio

from .. import context, usage
from ..errors import ServiceError
from ..policy import Policy
from .base import Behavior, Metadata, PolicyInterceptor


class UsageInterceptor(PolicyInterceptor):
    """Counts each tenant user's call in the process's usage meter."""

    def wrap(self, inner: Behavior, policy: Policy, metadata: Metadata) -> Behavior:
        if policy.public or policy.internal:
            return inner
        calls, feature = usage.counters_of(policy.rate_class, policy.feature)

        async def behavior(request: Any, ctx: aio.ServicerContext[Any, Any]) -> Any:
            tenant_id = context.tenant_user_call()
            if tenant_id is None:
                return await inner(request, ctx)
            refused_as: str | None = None
            try:
                return await inner(request, ctx)
            except ServiceError as exc:
                refused_as = usage.REFUSALS.get(exc.reason)
                raise
            finally:
                usage.active().call(tenant_id, calls, feature, refused_as)

        return behavior
