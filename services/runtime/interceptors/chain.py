"""The order of the server interceptor chain, in one place.

Outermost first; a new link is one line here.
"""

from __future__ import annotations

from ..auth import TokenVerifier
from ..entitlements import EntitlementDirectory
from ..policy import PolicyTable
from ..ratelimit import RateLimiter
from ..refusal_audit import RefusalAudit
from ..refusal_hold import RefusalHold
from ..tenants import TenantDirectory
from .authentication import AuthenticationInterceptor
from .authorization import AuthorizationInterceptor
from .base import PolicyInterceptor
from .call_concurrency import CallConcurrencyInterceptor
from .call_metrics import CallMetricsInterceptor
from .cross_tenant import CrossTenantInterceptor
from .entitlements import EntitlementsInterceptor
from .error_details import ErrorDetailsInterceptor
from .rate_limit import RateLimitInterceptor
from .request_id import RequestContextInterceptor
from .shutdown import ShutdownGate
from .standing_refusal import StandingRefusalInterceptor
from .tenant import TenantInterceptor
from .tenant_state import TenantStateInterceptor
from .text import RequestTextInterceptor
from .tracing import TracingInterceptor
from .usage import UsageInterceptor


def server_chain(
    policies: PolicyTable,
    verifier: TokenVerifier,
    tenants: TenantDirectory,
    entitlements: EntitlementDirectory,
    limiter: RateLimiter,
    refusals: RefusalAudit | None = None,
    gate: ShutdownGate | None = None,
    gateway_secret: bytes = b"",
    hold: RefusalHold | None = None,
) -> list[PolicyInterceptor]:
    gate = gate or ShutdownGate(policies)
    hold = hold or RefusalHold()
    gate.when_stopping(hold.release)
    return [
        StandingRefusalInterceptor(policies, verifier, limiter, hold),  # a boxed tenant's user: refused again at once
        RequestContextInterceptor(policies, gateway_secret),  # request id, method, peer, client address (never fails)
        TracingInterceptor(policies),  # the call's span (the caller's traceparent its parent); one access line
        CallMetricsInterceptor(policies),  # counted by tenant and method, once the status is known
        ErrorDetailsInterceptor(policies, refusals, hold),  # failures below: rich statuses (refusals audited, held)
        gate,  # once stopping: UNAVAILABLE, so clients retry elsewhere
        AuthenticationInterceptor(policies, verifier),  # who is calling (JWT or service identity)
        TenantInterceptor(policies),  # for which tenant (naming another one: the caller's own, until refused)
        TenantStateInterceptor(policies, tenants),  # is that tenant active
        UsageInterceptor(policies),  # its users' calls counted for billing, refusals below included (in memory)
        CrossTenantInterceptor(policies, entitlements, limiter),  # another tenant named: counted, refused, audited
        AuthorizationInterceptor(policies, tenants),  # with which permission (internal: services only)
        EntitlementsInterceptor(policies, entitlements),  # does the plan include it; DB connections it may hold
        CallConcurrencyInterceptor(policies),  # within its call_concurrency in flight here (or refused at once)
        RateLimitInterceptor(policies, limiter),  # within rpm_read / rpm_write (refusals remembered, leases)
        RequestTextInterceptor(policies),  # no NUL in any string field, display names clean
    ]
