"""Standing-refusal link: a tenant this process is refusing is refused again before any other link works.

The rate limiter remembers a refusal's wait (its *box*, ``rate_holdings.py``): until the
wait is over, every call of that tenant and rate class is refused by the rate-limit link,
but only after a request id, a span, authentication, the tenant, its state, usage, the
cross-tenant check, authorization, entitlements and the in-flight slot have each done their
work for it. A tenant flooding a service directly at 1,000 calls a second spent that work a
thousand times a second in the process every other tenant is served by: another tenant's
p99 went to 1.7x its quiet p99 (README, *Floods straight to a service*).

This link, the outermost, answers such a call with the very refusal the rate-limit link
would give (RESOURCE_EXHAUSTED ``RATE_LIMITED``, ErrorInfo, RetryInfo, ``retry-after-ms``),
held as the error link holds refusals (``refusal_hold.py``) and counted as a refusal in the
call metrics, ``towerco_tenant_rate_limited_total`` and the usage meter, when memory alone shows
it is a tenant user's own call of a boxed rate class:
- its bearer token was verified before and is still good (the verifier's cache; never a
  signature check here);
- it names no other tenant (a cross-tenant attempt takes the whole chain, to be audited);
- it does not say it came through the gateway (``x-towerco-gateway``): the whole chain
  checks that claim, and the gateway's own penalty box holds its tenants' refusals, so the
  error link holds only the others'; a call the box let through for its slot may wait for it
  in the rate-limit link.
Anything else goes on untouched, at the cost of a few dictionary lookups.

Such a refusal has no span and no request id: a flood's refusals are counted, not traced
one by one. What the skipped links would have said instead is said at the next call after
the box's wait (it never outlasts the wait its first refusal told): a tenant suspended in
the meantime, a user without the method's permission, or a plan without its feature is
refused as rate-limited until then.
"""

from __future__ import annotations

import time
from typing import Any

from grpc import aio

from .. import context, metrics, usage
from ..audit import GATEWAY_HEADER
from ..auth import TokenVerifier, bearer_token
from ..policy import Policy, PolicyTable
from ..ratelimit import RateLimiter
from ..refusal_hold import RefusalHold
from .base import Behavior, Metadata, PolicyInterceptor
from .error_details import end_call
from .rate_limit import rate_limited


class StandingRefusalInterceptor(PolicyInterceptor):
    """Refuses at once a tenant user's call while this process's limiter has the tenant boxed."""

    reads_metadata = True

    def __init__(self, policies: PolicyTable, verifier: TokenVerifier, limiter: RateLimiter, hold: RefusalHold) -> None:
        super().__init__(policies)
        self._verifier = verifier
        self._limiter = limiter
        self._hold = hold

    def wrap(self, inner: Behavior, policy: Policy, metadata: Metadata) -> Behavior:
        if policy.public or policy.internal:
            return inner
        rate_class = policy.rate_class
        calls, feature = usage.counters_of(rate_class, policy.feature)

        async def behavior(request: Any, ctx: aio.ServicerContext[Any, Any]) -> Any:
            tenant_id = self._boxed_caller(metadata)
            if tenant_id is None:
                return await inner(request, ctx)
            standing = self._limiter.standing(tenant_id, rate_class)
            if standing is None:
                return await inner(request, ctx)
            started = time.perf_counter()
            wait, per_minute = standing
            usage.active().call(tenant_id, calls, feature, usage.RATE_LIMITED)
            error = rate_limited(tenant_id, rate_class, per_minute, wait)
            holding = time.perf_counter()
            error = await self._hold.hold(error, ctx)
            held = time.perf_counter() - holding  # on purpose: not the service's time
            try:
                await end_call(ctx, error, policy)
            finally:
                seconds = time.perf_counter() - started - held
                metrics.active().call(tenant_id, rate_class, policy.method, error.code.name, seconds)

        return behavior

    def _boxed_caller(self, metadata: Metadata) -> str | None:
        """The calling tenant, when the call is known from memory to be one of its users' own."""
        header = metadata.single("authorization")
        if header is None or metadata.first(GATEWAY_HEADER) is not None:
            return None
        token = bearer_token(header)
        if token is None:
            return None
        try:
            caller = self._verifier.verify_cached(token)
        except Exception:  # not in the cache, expired, its issuer changed: the whole chain decides
            return None
        tenant_id = caller.tenant_id
        if caller.is_platform or tenant_id == context.PLATFORM_TENANT:
            return None
        named = metadata.single("x-tenant-id")
        if named is not None and named != tenant_id:
            return None
        return tenant_id
