"""Rate-limit link: each call of a tenant's user counts against the tenant's rate.

:class:`RateLimitInterceptor` counts the call against the tenant's ``rpm_read`` or
``rpm_write`` (by the method's ``rate_class``), from the entitlements the entitlements link
bound (``entitlements.py``); :func:`admit` is the count itself, which the cross-tenant link
also uses for refused attempts. The limiter answers most of them without Redis: a tenant it
has just refused is refused again until the wait Redis gave is over, and a high-rate
tenant's calls are spent from leases (``ratelimit.py``); the refusal is the same either way.

Calls of platform admins and platform services, and public calls, pass untouched: the
limits are a tenant's, and the platform's own work must not be throttled by them.
"""

from __future__ import annotations

from typing import Any

from grpc import aio

from .. import context, entitlements, metrics
from ..errors import ErrorReason, resource_exhausted, unavailable
from ..policy import Policy, PolicyTable
from ..ratelimit import RateLimiter
from .base import Behavior, Metadata, PolicyInterceptor


class RateLimitInterceptor(PolicyInterceptor):
    """RESOURCE_EXHAUSTED (RATE_LIMITED, with RetryInfo) over the tenant's rate for the method's class."""

    def __init__(self, policies: PolicyTable, limiter: RateLimiter) -> None:
        super().__init__(policies)
        self._limiter = limiter

    def wrap(self, inner: Behavior, policy: Policy, metadata: Metadata) -> Behavior:
        if policy.public:
            return inner

        async def behavior(request: Any, ctx: aio.ServicerContext[Any, Any]) -> Any:
            found = entitlements.current()
            tenant_id = context.tenant_user_call()
            if found is None or tenant_id is None:
                return await inner(request, ctx)
            await admit(self._limiter, tenant_id, policy.rate_class, found)
            return await inner(request, ctx)

        return behavior


async def admit(limiter: RateLimiter, tenant_id: str, rate_class: str, found: entitlements.Entitlements) -> None:
    """Count one ``rate_class`` call of the tenant; RESOURCE_EXHAUSTED (RATE_LIMITED) past its rate."""
    limit_name = f"rpm_{rate_class}"
    per_minute = found.limit(limit_name)
    decision = await limiter.decide(tenant_id, rate_class, per_minute)
    if decision.unavailable:
        raise unavailable(
            "request rates cannot be checked right now (Redis is unreachable); retry shortly",
            ErrorReason.RATE_LIMITER_UNAVAILABLE,
            decision.retry_after_seconds,
        )
    if not decision.allowed:
        metrics.active().rate_limited(tenant_id, rate_class)
        raise resource_exhausted(
            f"tenant {tenant_id!r} is over its {rate_class} rate of {per_minute} calls per minute; "
            f"retry in {decision.retry_after_seconds:.3f}s",
            ErrorReason.RATE_LIMITED,
            retry_after_seconds=decision.retry_after_seconds,
            limit=limit_name,
            per_minute=str(per_minute),
        )
