"""Tracing link: the call's span, and its one access line.

Just inside the request context (so the request id is known) and outside the error link
(so it sees the status the caller gets, whichever link refused the call).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
from grpc import aio
from opentelemetry.trace import Status, StatusCode

from .. import context, tracing
from ..policy import Policy
from .base import Behavior, Metadata, PolicyInterceptor, call_status

access_log = logging.getLogger("towerco.access")

#: Codes that mean the server failed (OpenTelemetry marks these server spans as errors).
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class TracingInterceptor(PolicyInterceptor):
    """Opens the call's span from the caller's ``traceparent``; logs one access line at the end."""

    reads_metadata = True

    def wrap(self, inner: Behavior, policy: Policy, metadata: Metadata) -> Behavior:
        async def behavior(request: Any, ctx: aio.ServicerContext[Any, Any]) -> Any:
            incoming = {key: value for key in tracing.TRACE_HEADERS if (value := metadata.first(key)) is not None}
            current = context.current()
            request_id = current.request_id if current else ""
            with tracing.server_span(policy.method, request_id, incoming) as (span, record):
                code = grpc.StatusCode.UNKNOWN
                try:
                    response = await inner(request, ctx)
                    code = call_status(ctx)
                    return response
                except aio.AbortError:
                    code = call_status(ctx)
                    raise
                except BaseException:  # cancelled by the client or at shutdown
                    code = grpc.StatusCode.CANCELLED
                    raise
                finally:
                    if tracing.recording():  # a dropped span keeps nothing: no status to work out for it
                        span.set_attribute(tracing.STATUS_ATTRIBUTE, code.value[0])
                        if code in SERVER_ERRORS:
                            span.set_status(Status(StatusCode.ERROR, code.name))
                    if access_log.isEnabledFor(logging.INFO):  # its arguments are not made for nothing
                        elapsed_ms = round((time.perf_counter() - record.started) * 1000, 1)
                        access_log.info(
                            "%s %s %.1fms",
                            policy.method,
                            code.name,
                            elapsed_ms,
                            extra={
                                "tenant": record.tenant or "-",
                                "method": policy.method,
                                "code": code.name,
                                "duration_ms": elapsed_ms,
                            },
                        )

        return behavior
