"""Rate-limit link: each call of a tenant's user counts against the tenant's rate.

:class:`RateLimitInterceptor` counts the call against the tenant's ``rpm_read`` or
``rpm_write`` (by the method's ``rate_class``), from the entitlements the entitlements link
bound (``entitlements.py``); :func:`admit` is the count itself, which the cross-tenant link
also uses for refused attempts. The limiter answers most of them without Redis: a tenant it
has just refused is refused again until the wait Redis gave is over, and a high-rate
tenant's calls are spent from leases (``ratelimit.py``); the refusal is the same either way.

Calls of platform admins and platform services, and public calls, pass untouched: the
limits are a tenant's, and the platform's own work must not be throttled by them.

A call the gateway's penalty box let through for a slot of the tenant's rate it counted as
due (``RATE_SLOT_HEADER``, believed only on a call carrying the gateway's secret) and that
meets a short wait here came just before that slot: the box's clock starts when the refused
call that taught it left Envoy, a little before Redis read its own. Such a call waits for
its slot (at most ``SLOT_WAIT_MOST_SECONDS``) and asks again rather than being refused, so
the box, which answers the tenant's other calls until the next slot, never holds one Redis
would admit (README, *Floods at the gateway*).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from grpc import aio

from .. import context, entitlements, metrics
from ..errors import ErrorReason, ServiceError, resource_exhausted, unavailable
from ..policy import Policy, PolicyTable, rate_limit_of
from ..ratelimit import RateLimiter
from .base import Behavior, Metadata, PolicyInterceptor

#: Set by gateway/penalty_box.lua on a call it let through for a slot it counted as due.
RATE_SLOT_HEADER = "x-towerco-rate-slot"
#: The longest a call let through for its slot waits for it here.
SLOT_WAIT_MOST_SECONDS = 0.25


class RateLimitInterceptor(PolicyInterceptor):
    """RESOURCE_EXHAUSTED (RATE_LIMITED, with RetryInfo) over the tenant's rate for the method's class."""

    def __init__(self, policies: PolicyTable, limiter: RateLimiter) -> None:
        super().__init__(policies)
        self._limiter = limiter

    def wrap(self, inner: Behavior, policy: Policy, metadata: Metadata) -> Behavior:
        if policy.public:
            return inner

        async def behavior(request: Any, ctx: aio.ServicerContext[Any, Any]) -> Any:
            limited = entitlements.of_tenant_user_call()
            if limited is None:
                return await inner(request, ctx)
            tenant_id, found = limited
            await admit(self._limiter, tenant_id, policy.rate_class, found, lambda: for_a_slot(ctx))
            return await inner(request, ctx)

        return behavior


def for_a_slot(ctx: aio.ServicerContext[Any, Any]) -> bool:
    """Whether the gateway let this call through for a slot of the tenant's rate."""
    bound = context.current()
    if bound is None or not bound.via_gateway:
        return False
    return any(key == RATE_SLOT_HEADER for key, _ in ctx.invocation_metadata() or ())


async def admit(
    limiter: RateLimiter,
    tenant_id: str,
    rate_class: str,
    found: entitlements.Entitlements,
    for_a_slot: Callable[[], bool] | None = None,
) -> None:
    """Count one ``rate_class`` call of the tenant; RESOURCE_EXHAUSTED (RATE_LIMITED) past its rate.

    ``for_a_slot``, asked only when the call is refused: whether it may wait a short refusal
    out (a call the gateway let through for its slot)."""
    per_minute = found.limit(rate_limit_of(rate_class))
    decision = await limiter.decide(tenant_id, rate_class, per_minute)
    waited = 0.0
    for _ in range(3):  # the box's wait, then Redis's: each try is at or after the slot
        if decision.allowed or decision.unavailable or for_a_slot is None:
            break
        if waited + decision.retry_after_seconds > SLOT_WAIT_MOST_SECONDS or not for_a_slot():
            break
        waited += decision.retry_after_seconds
        await asyncio.sleep(decision.retry_after_seconds)
        decision = await limiter.decide(tenant_id, rate_class, per_minute)
    if decision.unavailable:
        raise unavailable(
            "request rates cannot be checked right now (Redis is unreachable); retry shortly",
            ErrorReason.RATE_LIMITER_UNAVAILABLE,
            decision.retry_after_seconds,
        )
    if not decision.allowed:
        raise rate_limited(tenant_id, rate_class, per_minute, decision.retry_after_seconds)


def rate_limited(tenant_id: str, rate_class: str, per_minute: int, retry_after_seconds: float) -> ServiceError:
    """The refusal of a call over the tenant's ``rate_class`` rate (counted as such)."""
    metrics.active().rate_limited(tenant_id, rate_class)
    return resource_exhausted(
        f"tenant {tenant_id!r} is over its {rate_class} rate of {per_minute} calls per minute; "
        f"retry in {retry_after_seconds:.3f}s",
        ErrorReason.RATE_LIMITED,
        retry_after_seconds=retry_after_seconds,
        limit=rate_limit_of(rate_class),
        per_minute=str(per_minute),
    )
