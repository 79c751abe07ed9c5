"""Call-concurrency link: a tenant's calls in flight in this process, bounded by its plan.

A tenant well inside its rate can still send calls that are slow or expensive; with
enough of them at once it would hold the event loop's time and the connection pool that
every other tenant of the process needs. :class:`CallConcurrencyInterceptor` counts each
tenant's calls in flight and refuses one more over the plan's ``call_concurrency``
(basic 8, professional 16, enterprise 32) at once, before any work: RESOURCE_EXHAUSTED,
reason TENANT_CALLS_LIMIT, with RetryInfo. Waiting would only move the queue into the
process; the client knows best which of its calls to send again.

The count is per process, like the database bulkhead (``bulkhead.py``): a service run as
N replicas of W workers lets a tenant have N x W x ``call_concurrency`` calls in flight in
all. A slot is held for the call's whole life in this process and freed however it ends
(an answer, an error, the client's deadline or cancellation). Every Towerco RPC is unary;
a streaming one would hold its slot for the stream's life, as it would run inside here.

Calls of platform admins and platform services, and public calls, pass untouched: the
limits are a tenant's, and the platform's own work must not be throttled by them.

An admitted call costs two dictionary updates and no metric: a per-tenant in-flight gauge
would add two locked updates (3 to 5 µs measured) to every call. Refusals are counted
(``towerco_tenant_calls_limited_total`` and the tenant's ``calls_limited`` usage).
"""

from __future__ import annotations

from typing import Any

from grpc import aio

from .. import entitlements, metrics
from ..errors import ErrorReason, ServiceError, resource_exhausted
from ..plans import UNLIMITED
from ..policy import Policy, PolicyTable
from .base import Behavior, Metadata, PolicyInterceptor

LIMIT = "call_concurrency"
#: When a refused client should try again: the bound bites only on calls slow enough to
#: pile up, so a call of the tenant's is unlikely to have ended much sooner.
RETRY_AFTER_SECONDS = 0.5


class CallConcurrencyInterceptor(PolicyInterceptor):
    """RESOURCE_EXHAUSTED (TENANT_CALLS_LIMIT, with RetryInfo) over the tenant's calls in flight."""

    def __init__(self, policies: PolicyTable) -> None:
        super().__init__(policies)
        #: Calls in flight by tenant; a tenant with none has no entry. One event loop: no
        #: await between a check and its update, so no lock.
        self._in_flight: dict[str, int] = {}

    def in_flight(self, tenant_id: str) -> int:
        return self._in_flight.get(tenant_id, 0)

    def wrap(self, inner: Behavior, policy: Policy, metadata: Metadata) -> Behavior:
        if policy.public:
            return inner

        async def behavior(request: Any, ctx: aio.ServicerContext[Any, Any]) -> Any:
            limited = entitlements.of_tenant_user_call()
            if limited is None:
                return await inner(request, ctx)
            tenant_id, found = limited
            limit = found.limit(LIMIT)
            held = self._in_flight.get(tenant_id, 0)
            if limit != UNLIMITED and held >= limit:
                metrics.active().calls_limited(tenant_id)
                raise _refused(tenant_id, limit)
            self._in_flight[tenant_id] = held + 1
            try:
                return await inner(request, ctx)
            finally:
                left = self._in_flight[tenant_id] - 1
                if left:
                    self._in_flight[tenant_id] = left
                else:
                    del self._in_flight[tenant_id]

        return behavior


def _refused(tenant_id: str, limit: int) -> ServiceError:
    return resource_exhausted(
        f"tenant {tenant_id!r} already has {limit} calls in flight in this service process, "
        f"all its {LIMIT} allows; wait for one to finish or retry in {RETRY_AFTER_SECONDS}s",
        ErrorReason.TENANT_CALLS_LIMIT,
        retry_after_seconds=RETRY_AFTER_SECONDS,
        limit=LIMIT,
        max_in_flight=str(limit),
    )
