"""What tracing and the access line cost a call: the tracing link alone, in the process, per call.

The link wraps a handler that does nothing, so the difference to calling that handler
directly is the link's whole cost: the span (started from a caller's ``traceparent``, its
attributes, the tenant named on it, the ``traceparent`` an outgoing call would carry) and
the access line. Measured as a service runs it:
- no SDK (the API's no-op tracer): the link's own bookkeeping, no trace ids at all;
- sampled out: the services without ``OTEL_EXPORTER_OTLP_ENDPOINT`` (ids made and passed on);
- recorded, not exported: for comparison, what sampling out saves;
- exported: a batch processor as with an endpoint, its exporter dropping the batches (so
  the number is the request path's share; encoding and sending happen on the batch thread);
each without a log handler at INFO (``LOG_LEVEL=WARNING``: the access line is skipped), and
sampled out with the access line written as JSON to /dev/null.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from typing import IO, Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from towerco.sites.v1 import sites_service_pb2

from services.runtime import logs, tracing
from services.runtime.interceptors.base import Metadata
from services.runtime.interceptors.tracing import TracingInterceptor
from services.runtime.policy import PolicyTable

CALLS = 20_000
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class _Dropping(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class _Context:
    """What the link asks of a gRPC servicer context: the status set, none for OK."""

    def code(self) -> None:
        return None


async def _handler(request: Any, ctx: Any) -> Any:
    tracing.tag_tenant("bench_tenant")
    tracing.outgoing()
    return request


async def _per_call_us(behavior: Any) -> float:
    ctx = _Context()
    for _ in range(1000):
        await behavior(None, ctx)
    start = time.perf_counter()
    for _ in range(CALLS):
        await behavior(None, ctx)
    return (time.perf_counter() - start) / CALLS * 1e6


async def _measure(sink: IO[str]) -> dict[str, float]:
    policies = PolicyTable.from_services([sites_service_pb2.DESCRIPTOR.services_by_name["SiteService"]])
    policy = policies.get("/towerco.sites.v1.SiteService/GetSite")
    assert policy is not None
    wrapped = TracingInterceptor(policies).wrap(_handler, policy, Metadata([("traceparent", TRACEPARENT)]))
    root = logging.getLogger()
    costs: dict[str, float] = {}
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        tracing.use(None)
        baseline = await _per_call_us(_handler)
        root.setLevel(logging.WARNING)
        modes = [
            ("no SDK", None),
            ("sampled out (no endpoint)", TracerProvider(sampler=ALWAYS_OFF)),
            ("recorded, not exported", TracerProvider()),
            ("exported (batch)", TracerProvider()),
        ]
        for name, provider in modes:
            processors = (BatchSpanProcessor(_Dropping()),) if name.startswith("exported") else ()
            tracing.use(provider, *processors)
            costs[f"{name}, access line off"] = await _per_call_us(wrapped) - baseline
        logs.configure("sites", "INFO", "json")
        root.handlers[0].setStream(sink)  # type: ignore[attr-defined]
        tracing.use(TracerProvider(sampler=ALWAYS_OFF))
        costs["sampled out, access line written as JSON"] = await _per_call_us(wrapped) - baseline
    finally:
        tracing.use(None)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    return costs


def bench_tracing() -> dict[str, float]:
    """Per-call cost of the tracing link (span and access line) in microseconds, by mode."""
    with open(os.devnull, "w") as sink:
        return asyncio.run(_measure(sink))


if __name__ == "__main__":
    for mode, cost in bench_tracing().items():
        print(f"tracing link {mode:<42} {cost:8.2f} us per call")
