"""Traces: one span per call, W3C ``traceparent`` between services, OTLP export when asked.

Every process runs the OpenTelemetry SDK, so each call has a trace id that its log lines
carry and that travels to the services it calls (``traceparent`` in the metadata, see
``channels.py``). Spans are recorded only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (then a
batch processor sends them there over OTLP gRPC, and a caller's "not sampled" is respected).
Without it every span is sampled out: its ids are still made and passed on, nothing else
is kept, which costs about half of recording it (``make bench``).

The server side is :class:`~.interceptors.tracing.TracingInterceptor`, which opens the
call's span from the caller's ``traceparent``; the tenant link names the tenant on it
(:func:`tag_tenant`). Work a service does later on a call's behalf (the audit relay) picks
the call's context up again with :func:`carrier` and :func:`resumed`.

The endpoint and the batch delay come from the settings table, and the resource and the
sampler are set here, so ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES`` and
``OTEL_TRACES_SAMPLER`` have no effect; the SDK's finer knobs (exporter headers and timeout,
queue sizes, span limits) it still reads itself, with its own defaults.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
from opentelemetry.trace import Link, Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

#: Attribute names (OpenTelemetry's RPC conventions, plus the platform's own).
TENANT_ATTRIBUTE = "tenant.id"
REQUEST_ID_ATTRIBUTE = "request.id"
STATUS_ATTRIBUTE = "rpc.grpc.status_code"
#: The metadata keys of W3C trace context: what the propagator reads and writes.
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})

_PROPAGATOR = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None
_tracer: trace.Tracer = trace.NoOpTracer()
#: Whether a span may be recorded: not without a provider, nor when its sampler drops every span.
_recording = False
#: The provider's id generator when its sampler drops every span (see :func:`dropped_span`).
_dropped_ids: IdGenerator | None = None


def configure(service: str, endpoint: str = "", schedule_delay_ms: int = 5000) -> TracerProvider:
    """Trace this process as ``service``: spans recorded and sent to ``endpoint`` if set, else sampled out."""
    provider = TracerProvider(
        resource=Resource({"service.name": f"towerco-{service}", "service.namespace": "towerco"}),
        sampler=ParentBased(ALWAYS_ON) if endpoint else ALWAYS_OFF,
    )
    if endpoint:
        # Imported only when used: the exporter pulls in its own gRPC client machinery.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"))
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=schedule_delay_ms))
    use(provider)
    return provider


def use(provider: TracerProvider | None, *processors: SpanProcessor) -> None:
    """Make ``provider`` (with ``processors`` added) the one spans come from; None: record nothing."""
    global _provider, _tracer, _recording, _dropped_ids
    for processor in processors:
        assert provider is not None
        provider.add_span_processor(processor)
    _provider = provider
    _tracer = provider.get_tracer("towerco") if provider is not None else trace.NoOpTracer()
    _recording = provider is not None and provider.sampler is not ALWAYS_OFF
    _dropped_ids = provider.id_generator if provider is not None and provider.sampler is ALWAYS_OFF else None


def dropped_span(parent: Context | None) -> Span:
    """The span the SDK's ``start_span`` makes when its sampler drops every span (ALWAYS_OFF), made directly.

    The same span context: the parent's trace (else a new trace id), a new span id, the
    parent's trace state, not sampled, the random-trace-id flag as the SDK sets it. Without
    the SDK's layers (sampler call, sampling result, its span metrics) it costs a third.
    """
    assert _dropped_ids is not None
    parent_context = trace.get_current_span(parent).get_span_context()
    if parent_context.is_valid:
        trace_id, random_id, state = (
            parent_context.trace_id,
            parent_context.trace_flags.random_trace_id,
            parent_context.trace_state,
        )
    else:
        trace_id, random_id, state = _dropped_ids.generate_trace_id(), _dropped_ids.is_trace_id_random(), None
    flags = _RANDOM_UNSAMPLED if random_id else _UNSAMPLED
    span_id = _dropped_ids.generate_span_id()
    return trace.NonRecordingSpan(trace.SpanContext(trace_id, span_id, False, flags, state))


_UNSAMPLED = trace.TraceFlags(trace.TraceFlags.DEFAULT)
_RANDOM_UNSAMPLED = trace.TraceFlags(trace.TraceFlags.DEFAULT | trace.TraceFlags.RANDOM_TRACE_ID)


def shutdown() -> None:
    """Send what the batch holds and stop: at the end of the process."""
    if _provider is not None:
        _provider.shutdown()


@dataclass
class CallRecord:
    """What the call's span learns as the chain runs, read back for the access line."""

    method: str
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    tenant: str | None = None


_call: ContextVar[CallRecord | None] = ContextVar("towerco_call", default=None)


def server_span(method: str, request_id: str, incoming: Mapping[str, str]) -> ServerSpan:
    """The span of one incoming call, child of the caller's ``traceparent`` when it sent one (:class:`ServerSpan`)."""
    return ServerSpan(method, request_id, incoming)


class ServerSpan:
    """The span of one incoming call, child of the caller's ``traceparent`` when it sent one.

    ``with server_span(method, request_id, incoming) as (span, record):`` the span is current
    and ``record`` is the call's :class:`CallRecord`. Sampled out by configuration (no
    endpoint), the span is started as the SDK starts any (its ids and the caller's trace
    carry on) and made current directly: no attributes for a span that keeps none, and none
    of ``start_as_current_span``'s layers. A class, not a generator: it runs on every call.
    """

    __slots__ = ("_attached", "_call_token", "_incoming", "_method", "_recorded", "_request_id")

    def __init__(self, method: str, request_id: str, incoming: Mapping[str, str]) -> None:
        self._method = method
        self._request_id = request_id
        self._incoming = incoming
        self._attached: Token[Context] | None = None
        self._recorded: AbstractContextManager[Span] | None = None

    def __enter__(self) -> tuple[Span, CallRecord]:
        method = self._method
        parent = _PROPAGATOR.extract(self._incoming) if self._incoming else None
        record = CallRecord(method, self._request_id)
        self._call_token = _call.set(record)
        if not _recording:
            if _dropped_ids is not None:
                span = dropped_span(parent)
            else:
                span = _tracer.start_span(method.lstrip("/"), context=parent, kind=SpanKind.SERVER)
            self._attached = otel_context.attach(trace.set_span_in_context(span))
            return span, record
        service, _, rpc = method.lstrip("/").partition("/")
        attributes = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": rpc,
            REQUEST_ID_ATTRIBUTE: self._request_id,
        }
        self._recorded = _tracer.start_as_current_span(
            method.lstrip("/"), context=parent, kind=SpanKind.SERVER, attributes=attributes,
            record_exception=False, set_status_on_exception=False,
        )  # fmt: skip
        try:
            return self._recorded.__enter__(), record
        except BaseException:
            _call.reset(self._call_token)
            raise

    def __exit__(self, *exc_info: Any) -> None:
        try:
            if self._recorded is not None:
                self._recorded.__exit__(*exc_info)
            elif self._attached is not None:
                otel_context.detach(self._attached)
        finally:
            _call.reset(self._call_token)


def recording() -> bool:
    """Whether spans may be recorded (an endpoint is set): else every span is dropped and keeps nothing."""
    return _recording


def tag_tenant(tenant_id: str) -> None:
    """The call acts on ``tenant_id``: say so on its span and its access line."""
    record = _call.get()
    if record is not None:
        record.tenant = tenant_id
    if _recording:
        trace.get_current_span().set_attribute(TENANT_ATTRIBUTE, tenant_id)


def outgoing() -> list[tuple[str, str]]:
    """The current trace context as metadata for an outgoing call (empty outside any span)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return list(carrier.items())


def carrier() -> str:
    """The current span's ``traceparent``, to be kept with work done later on its behalf ("" if none)."""
    return dict(outgoing()).get("traceparent", "")


@contextmanager
def resumed(name: str, carriers: Iterable[str], **attributes: str | int) -> Iterator[Span]:
    """A span for work done on behalf of earlier calls, given their :func:`carrier` values.

    The first call's trace continues (so a provisioning and the delivery of its audit events
    are one trace); the others are linked, as a batch serves several calls at once.
    """
    contexts = [
        trace.get_current_span(_PROPAGATOR.extract({"traceparent": value})).get_span_context()
        for value in carriers
        if value
    ]
    valid = list({(c.trace_id, c.span_id): c for c in contexts if c.is_valid}.values())
    parent: Context | None = trace.set_span_in_context(trace.NonRecordingSpan(valid[0])) if valid else None
    links = [Link(c) for c in valid[1:]]
    with _tracer.start_as_current_span(
        name, context=parent, kind=SpanKind.INTERNAL, links=links, attributes=attributes
    ) as span:
        yield span


def _span_context(traceparent: str) -> trace.SpanContext:
    return trace.get_current_span(_PROPAGATOR.extract({"traceparent": traceparent})).get_span_context()


def current_ids() -> tuple[str, str]:
    """The current trace and span ids in hex, or ``("-", "-")`` outside any span."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return "-", "-"
    return format(span_context.trace_id, "032x"), format(span_context.span_id, "016x")
