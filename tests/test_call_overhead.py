"""Per-call work the server chain does not repeat: links share one reading of the metadata,
and a sampled-out call's span is started without the recording machinery yet carries the trace.

Timings are the benchmarks' (``make bench``); these check that the cheaper paths behave as before.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import operator
import uuid
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from towerco.sites.v1 import sites_service_pb2

from services.runtime import bulkhead, context, logs, metrics, tracing
from services.runtime.context import Caller, RequestContext
from services.runtime.interceptors.base import CALL_METADATA, UNREAD, Behavior, Chain, Metadata, PolicyInterceptor
from services.runtime.interceptors.request_id import new_request_id
from services.runtime.policy import Policy, PolicyTable

GET_SITE = "/towerco.sites.v1.SiteService/GetSite"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class _Reading(PolicyInterceptor):
    """A link that keeps the Metadata each call hands it."""

    reads_metadata = True

    def __init__(self, policies: PolicyTable, seen: list[Metadata]) -> None:
        super().__init__(policies)
        self._seen = seen

    def wrap(self, inner: Behavior, policy: Policy, metadata: Metadata) -> Behavior:
        self._seen.append(metadata)

        async def behavior(request: Any, ctx: Any) -> Any:
            return await inner(request, ctx)

        return behavior


class _Details:
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.method = GET_SITE
        self.invocation_metadata = metadata


class _Wrapping(_Reading):
    """A link whose wrapping depends on the method alone."""

    reads_metadata = False


class _Peeking(_Wrapping):
    """A link that reads the metadata without saying so."""

    def wrap(self, inner: Behavior, policy: Policy, metadata: Metadata) -> Behavior:
        metadata.first("x-tenant-id")
        return inner


async def _servicer(request: Any, ctx: Any) -> Any:
    return request


def _policies() -> PolicyTable:
    return PolicyTable.from_services([sites_service_pb2.DESCRIPTOR.services_by_name["SiteService"]])


async def _find(links: list[PolicyInterceptor], handler: Any, details: _Details) -> Any:
    async def innermost(_: Any) -> Any:
        return handler

    continuation: Any = innermost
    for link in reversed(links):
        continuation = functools.partial(link.intercept_service, continuation)  # as grpc.aio chains them
    return await continuation(details)


def test_the_links_of_a_call_share_one_reading_of_its_metadata_and_the_next_call_gets_its_own() -> None:
    seen: list[Metadata] = []
    links: list[PolicyInterceptor] = [_Reading(_policies(), seen) for _ in range(5)]
    handler = grpc.unary_unary_rpc_method_handler(_servicer)

    async def calls() -> None:
        for tenant in ("ta", "tb"):
            found = await _find(links, handler, _Details((("x-tenant-id", tenant), ("X-Request-Id", f"r-{tenant}"))))
            assert await found.unary_unary("request", None) == "request"

    asyncio.run(calls())
    first, second = seen[:5], seen[5:]
    assert all(m is first[0] for m in first) and all(m is second[0] for m in second)
    assert first[0] is not second[0]
    assert (first[0].single("x-tenant-id"), first[0].first("x-request-id")) == ("ta", "r-ta")
    assert (second[0].single("x-tenant-id"), second[0].first("x-request-id")) == ("tb", "r-tb")


def test_links_that_do_not_read_the_metadata_wrap_a_method_once_inside_those_that_do() -> None:
    outer: list[Metadata] = []
    inner: list[Metadata] = []
    links: list[PolicyInterceptor] = [_Reading(_policies(), outer), _Wrapping(_policies(), inner)]
    links.append(_Wrapping(_policies(), inner))
    handler = grpc.unary_unary_rpc_method_handler(_servicer)

    async def calls() -> list[Any]:
        found = []
        for tenant in ("ta", "tb", "tc"):
            found.append(await _find(links, handler, _Details((("x-tenant-id", tenant),))))
            assert await found[-1].unary_unary("request", None) == "request"
        found.append(await _find(links[1:], handler, _Details(())))
        found.append(await _find(links[1:], handler, _Details(())))
        return found

    first, second, third, inner_once, inner_again = asyncio.run(calls())
    assert len(inner) == 2  # the two inner links wrapped GetSite once each, for five calls
    assert [m.single("x-tenant-id") for m in outer] == ["ta", "tb", "tc"]  # the outer one for each call
    assert first is not second and second is not third  # the outer link's wrapping is each call's
    assert inner_once is inner_again and inner_once is not handler  # the inner links': kept
    with pytest.raises(RuntimeError, match="sets reads_metadata = True"):
        asyncio.run(_find([_Peeking(_policies(), [])], handler, _Details((("x-tenant-id", "ta"),))))


def test_a_sampled_out_call_continues_the_callers_trace_with_a_span_of_its_own_and_records_nothing() -> None:
    kept = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    tracing.use(provider, SimpleSpanProcessor(kept))
    try:
        with tracing.server_span(GET_SITE, "r-1", {"traceparent": TRACEPARENT}) as (span, record):
            tracing.tag_tenant("ta")
            context = trace.get_current_span().get_span_context()
            assert trace.get_current_span() is span and not span.is_recording()
            assert format(context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
            assert format(context.span_id, "016x") != "b7ad6b7169203331"  # a span of its own
            assert tracing.outgoing() == [("traceparent", f"00-{context.trace_id:032x}-{context.span_id:016x}-00")]
            assert record.tenant == "ta"
        with tracing.server_span(GET_SITE, "r-2", {}) as (span, _):
            fresh = span.get_span_context()
            assert fresh.is_valid and fresh.trace_id != context.trace_id
        assert trace.get_current_span() is trace.INVALID_SPAN  # made current for the call only
        assert tracing.current_ids() == ("-", "-")
        assert kept.get_finished_spans() == ()
    finally:
        tracing.use(None)


def test_a_derived_request_context_is_what_dataclasses_replace_makes() -> None:
    original = RequestContext(request_id="r-1", method=GET_SITE, peer="ipv4:127.0.0.1:5", peer_ip="127.0.0.1")
    caller = Caller(subject="user-1", tenant_id="ta", role="viewer", permissions=frozenset(), token="t")
    derived = context.derive(original, caller=caller, tenant_id="ta")
    assert derived == dataclasses.replace(original, caller=caller, tenant_id="ta")
    assert hash(derived) == hash(dataclasses.replace(original, caller=caller, tenant_id="ta"))
    assert (original.caller, original.tenant_id) == (None, None)  # the original is left alone
    with pytest.raises(dataclasses.FrozenInstanceError):
        derived.tenant_id = "tb"  # type: ignore[misc]
    with pytest.raises(TypeError, match="no field tenant"):
        context.derive(original, tenant="ta")


def test_the_text_lines_time_is_written_as_logging_writes_it() -> None:
    mine, standard = logs.TextFormatter("sites"), logging.Formatter()
    for created in (1_796_000_000.0, 1_796_000_000.5, 1_796_000_000.999, 1_796_000_001.25, 1_796_000_000.123):
        record = logging.LogRecord("towerco.access", logging.INFO, "", 0, "line", None, None)
        record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
        assert mine.formatTime(record) == standard.formatTime(record)


def test_a_bound_request_context_and_metrics_record_last_for_their_block_even_when_it_raises() -> None:
    outer = RequestContext(request_id="r-outer", method=GET_SITE)
    inner = context.derive(outer, request_id="r-inner")
    with context.Bound(context._current, outer) as bound:
        assert bound is outer and context.current() is outer
        with pytest.raises(RuntimeError), context.bind(inner) as again:
            assert again is inner and context.current() is inner
            raise RuntimeError("the call failed")
        assert context.current() is outer
    assert context.current() is None
    with metrics.recording() as first:
        metrics.note_tenant("ta", by_platform=False)
        with metrics.recording() as second:
            metrics.note_tenant("tb", by_platform=True)
        metrics.note_tenant("tc", by_platform=False)
    assert (first.tenant_id, second.tenant_id) == ("tc", metrics.PLATFORM_CALLER)
    with bulkhead.limited(3), pytest.raises(RuntimeError), bulkhead.limited(-1):
        assert bulkhead.current_limit() == -1
        raise RuntimeError("the call failed")
    assert bulkhead.current_limit() is None


class _Tracing(_Reading):
    """A link that notes, in call order, that its behaviour ran, and the tenant header it read then."""

    def __init__(self, policies: PolicyTable, name: str, ran: list[str], reads: bool) -> None:
        super().__init__(policies, [])
        self._name, self._ran = name, ran
        self.reads_metadata = reads  # type: ignore[misc]

    def wrap(self, inner: Behavior, policy: Policy, metadata: Metadata) -> Behavior:
        self._seen.append(metadata)

        async def behavior(request: Any, ctx: Any) -> Any:
            self._ran.append(f"{self._name}:{metadata.single('x-tenant-id')}" if self.reads_metadata else self._name)
            return await inner(request, ctx)

        return behavior

    def deserializer(self, original: Any) -> Any:
        return lambda data: (self._name, original(data))


class _Context:
    """What a behaviour is handed as the call's context: its invocation metadata."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


class _Server:
    """Keeps what a servicer registers on it."""

    def __init__(self) -> None:
        self.generic: list[Any] = []
        self.registered: dict[str, dict[str, Any]] = {}
        self.port = 5

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.registered[service] = handlers


def test_chained_links_are_wrapped_once_per_method_and_run_in_the_chains_order_reading_each_calls_metadata() -> None:
    policies, ran = _policies(), list[str]()
    links: list[PolicyInterceptor] = [
        _Tracing(policies, name, ran, reads) for name, reads in (("a", True), ("b", False), ("c", True), ("d", False))
    ]
    chain = Chain(links)
    handler = grpc.unary_unary_rpc_method_handler(_servicer, request_deserializer=bytes.decode)
    chained: Any = chain.handler(GET_SITE, handler)
    assert chained is not None

    async def calls() -> list[Any]:
        return [await chained.unary_unary("request", _Context((("x-tenant-id", t),))) for t in ("ta", "tb")]

    assert asyncio.run(calls()) == ["request", "request"]
    # outermost first, as separate interceptors run them; each reading link saw its own call's metadata
    assert ran == ["a:ta", "b", "c:ta", "d", "a:tb", "b", "c:tb", "d"]
    seen = [link._seen for link in links]  # type: ignore[attr-defined]
    assert [len(s) for s in seen] == [1, 1, 1, 1]  # every link wrapped GetSite once, for both calls
    assert seen[0][0] is CALL_METADATA and seen[1][0] is UNREAD  # the running call's metadata, or none
    with pytest.raises(RuntimeError, match="outside its behaviour"):
        CALL_METADATA.first("x-tenant-id")  # no call is running
    assert chained.request_deserializer(b"x") == ("a", ("b", ("c", ("d", "x"))))  # the outermost link's decodes first
    assert chained.response_serializer is handler.response_serializer

    health = grpc.unary_unary_rpc_method_handler(_servicer)
    assert chain.handler("/towerco.sites.v1.SiteService/Nope", handler) is None  # fail closed
    assert chain.handler("/grpc.health.v1.Health/Check", health) is health  # plumbing passes

    # Registered as a servicer registers: by name (the server finds these first) and generically.
    server = _Server()
    registering: Any = chain.registering(server)  # type: ignore[arg-type]
    registering.add_registered_method_handlers("towerco.sites.v1.SiteService", {"GetSite": handler, "Nope": handler})
    service = grpc.method_handlers_generic_handler("towerco.sites.v1.SiteService", {"GetSite": handler})
    registering.add_generic_rpc_handlers([service])
    assert registering.port == 5  # anything else is the server's
    assert list(server.registered["towerco.sites.v1.SiteService"]) == ["GetSite"]  # no policy: not served
    by_name = server.registered["towerco.sites.v1.SiteService"]["GetSite"]
    details, unknown = _Details(()), _Details(())
    unknown.method = "/towerco.sites.v1.SiteService/Nope"
    found: Any = server.generic[0].service(details)
    assert found is server.generic[0].service(details) and found is not handler  # chained once, kept
    assert server.generic[0].service(unknown) is None
    ran.clear()
    assert asyncio.run(by_name.unary_unary("request", _Context((("x-tenant-id", "tc"),)))) == "request"
    assert asyncio.run(found.unary_unary("request", _Context((("x-tenant-id", "td"),)))) == "request"
    assert ran == ["a:tc", "b", "c:tc", "d", "a:td", "b", "c:td", "d"]
    with pytest.raises(ValueError, match="share one policy table"):
        Chain([_Reading(_policies(), []), _Reading(_policies(), [])])


def test_a_dropped_span_has_the_span_context_the_sdk_gives_a_span_its_sampler_drops() -> None:
    provider = TracerProvider(sampler=ALWAYS_OFF)
    tracing.use(provider)
    try:
        sdk = provider.get_tracer("sdk")
        for carrier in (
            {"traceparent": TRACEPARENT, "tracestate": "vendor=1,other=2"},
            {"traceparent": TRACEPARENT.replace("-01", "-00")},
            {"traceparent": TRACEPARENT.replace("-01", "-03")},  # the caller's random-trace-id flag
            {},
        ):
            parent = tracing._PROPAGATOR.extract(carrier) if carrier else None
            mine = tracing.dropped_span(parent).get_span_context()
            theirs = sdk.start_span("GetSite", context=parent, kind=trace.SpanKind.SERVER).get_span_context()
            assert not tracing.dropped_span(parent).is_recording()
            assert (mine.is_remote, mine.trace_flags, mine.trace_state) == (
                theirs.is_remote,
                theirs.trace_flags,
                theirs.trace_state,
            )
            assert mine.is_valid and mine.span_id != theirs.span_id
            assert (mine.trace_id == theirs.trace_id) == bool(carrier)  # the caller's trace, else a new one
    finally:
        tracing.use(None)


def test_a_new_request_id_is_what_uuid4_hex_makes() -> None:
    made = {new_request_id() for _ in range(2000)}
    assert len(made) == 2000  # random
    for value in made:
        parsed = uuid.UUID(hex=value)
        assert (parsed.hex, parsed.version, parsed.variant) == (value, 4, uuid.RFC_4122)
    # every bit uuid4 leaves random is set in some id and clear in another
    ones = functools.reduce(operator.or_, (int(v, 16) for v in made))
    zeros = functools.reduce(operator.and_, (int(v, 16) for v in made))
    assert ones == int(uuid.UUID(int=(1 << 128) - 1, version=4).hex, 16)
    assert zeros == int(uuid.UUID(int=0, version=4).hex, 16)
