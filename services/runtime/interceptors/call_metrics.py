"""Metrics link: every call counted once its status is known, by tenant and by method.

It sits outside the error link, so it sees the status the caller gets, refusals of every
link inside it included; the tenant link tells it the call's tenant
(:func:`~services.runtime.metrics.note_tenant`), since that binding ends with the call.
What it records and how a status becomes an outcome: ``services/runtime/metrics.py``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from grpc import aio

from .. import metrics
from ..policy import Policy
from .base import Behavior, Metadata, PolicyInterceptor, call_status


class CallMetricsInterceptor(PolicyInterceptor):
    """Records each call's tenant, rate class, method, status and duration."""

    def wrap(self, inner: Behavior, policy: Policy, metadata: Metadata) -> Behavior:
        method = policy.method
        rate_class = policy.rate_class

        async def behavior(request: Any, ctx: aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            code = "OK"
            with metrics.recording() as record:
                try:
                    return await inner(request, ctx)
                except aio.AbortError:
                    code = call_status(ctx).name
                    raise
                except asyncio.CancelledError:
                    # The caller hung up, or its deadline passed.
                    code = "DEADLINE_EXCEEDED" if (ctx.time_remaining() or 1.0) <= 0 else "CANCELLED"
                    raise
                except BaseException:
                    code = "UNKNOWN"  # the error link lets nothing else out: a bug
                    raise
                finally:
                    seconds = time.perf_counter() - started - record.held_seconds
                    metrics.active().call(record.tenant_id, rate_class, method, code, seconds)

        return behavior
