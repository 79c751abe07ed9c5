"""Traces: every call a span, one trace across services, exported over OTLP when configured.

An OTLP trace receiver runs in the test's process (the collector's gRPC contract from
opentelemetry-proto) and services of the test's own are started with
``OTEL_EXPORTER_OTLP_ENDPOINT`` pointed at it and a short batch delay (the session's
services export nothing). The audit relay's test runs a relay in the test's process, over
an outbox of its own, with its spans recorded in memory.
"""

from __future__ import annotations

import http.client
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb
from towerco.tenant.v1 import tenant_registry_service_pb2_grpc as tenant_grpc

from deploy.local.stack import Stack
from gateway.config import GatewaySettings
from services.runtime import audit, tracing
from services.runtime.audit import Auditor, AuditRelay
from services.runtime.channels import propagation_metadata
from services.runtime.db import Database
from services.runtime.identity import ServiceIdentity
from services.runtime.settings import DEFAULT_JWT_AUDIENCE, DEFAULT_SERVICE_JWT_ISSUER, DEV_SERVICE_KEY_ID

from .conftest import ExtraService
from .support import bearer, free_port


@dataclass(frozen=True)
class ExportedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    status_code: int


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[ExportedSpan] = []
        self._lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ExportedSpan(
                            service=str(resource.get("service.name", "")),
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            status_code=span.status.code,
                        )
                    )
        with self._lock:
            self.spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def in_trace(self, trace_id: str) -> list[ExportedSpan]:
        with self._lock:
            return [span for span in self.spans if span.trace_id == trace_id]


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[Collector, str]]:
    """The receiver and the ``OTEL_EXPORTER_OTLP_ENDPOINT`` that reaches it."""
    receiver = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield receiver, f"http://127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture
def traced(collector: tuple[Collector, str], extra_service: Callable[..., ExtraService]) -> Callable[..., ExtraService]:
    """``traced(name, env)``: a process of service ``name`` that exports its spans to the collector."""

    def start(name: str, env: dict[str, str] | None = None) -> ExtraService:
        return extra_service(
            name, {"OTEL_EXPORTER_OTLP_ENDPOINT": collector[1], "OTEL_BSP_SCHEDULE_DELAY": "50", **(env or {})}
        )

    return start


def traceparent() -> tuple[str, str, str]:
    """A caller's W3C trace context: the header, its trace id and its span id."""
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def test_a_provisioning_is_one_trace_from_the_registry_to_the_feature_gate(
    collector: tuple[Collector, str],
    traced: Callable[..., ExtraService],
    platform_token: str,
    eventually: Callable[..., Any],
) -> None:
    receiver, _ = collector
    features = traced("features")
    registry = traced("tenant", {"FEATURES_TARGET": features.target})
    header, trace_id, client_span = traceparent()
    tenant_id = f"tr_{uuid.uuid4().hex[:10]}"
    with grpc.insecure_channel(registry.target) as channel:
        tenant_grpc.TenantRegistryServiceStub(channel).CreateTenant(
            tenant_pb.CreateTenantRequest(
                tenant_id=tenant_id,
                tenant=tenant_pb.Tenant(display_name="Traced Towers", plan="basic", admin_email="noc@traced.example"),
                request_id=f"trace-{tenant_id}",
            ),
            metadata=bearer(platform_token, **{"traceparent": header, "x-request-id": f"trace-{tenant_id}"}),
            timeout=10,
        )

    def both_services() -> tuple[ExportedSpan, ExportedSpan]:
        spans = receiver.in_trace(trace_id)
        create = [s for s in spans if s.name.endswith("/CreateTenant")]
        register = [s for s in spans if s.name.endswith("/RegisterTenant")]
        assert create and register, [(s.service, s.name) for s in spans]
        return create[0], register[0]

    create, register = eventually(both_services, within=10.0, interval=0.1)
    assert (create.service, register.service) == ("towerco-tenant", "towerco-features")
    # The registry's span continues the caller's trace; the feature gate's continues the registry's.
    assert create.parent_span_id == client_span
    assert register.parent_span_id == create.span_id
    for span in (create, register):
        assert span.attributes["rpc.system"] == "grpc"
        assert span.attributes["tenant.id"], span
        assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    assert create.attributes["rpc.service"] == "towerco.tenant.v1.TenantRegistryService"
    assert create.attributes["rpc.method"] == "CreateTenant"
    assert create.attributes["tenant.id"] == "platform"  # the platform admin's own tenant
    assert create.attributes["request.id"] == register.attributes["request.id"] == f"trace-{tenant_id}"


def test_a_refused_call_is_a_span_with_its_grpc_status_and_tenant(
    collector: tuple[Collector, str],
    traced: Callable[..., ExtraService],
    tenant_pair: tuple[str, str],
    token: Callable[..., str],
    eventually: Callable[..., Any],
) -> None:
    receiver, _ = collector
    sites = traced("sites")
    tenant, _ = tenant_pair
    header, trace_id, _ = traceparent()
    with grpc.insecure_channel(sites.target) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            sites_grpc.SiteServiceStub(channel).GetSite(
                sites_pb.GetSiteRequest(site_id="not-there"),
                metadata=bearer(token(tenant), traceparent=header),
                timeout=10,
            )
    code = refused.value.code()
    assert code == grpc.StatusCode.NOT_FOUND

    def span() -> ExportedSpan:
        spans = receiver.in_trace(trace_id)
        assert spans
        return spans[0]

    got = eventually(span, within=10.0, interval=0.1)
    assert got.service == "towerco-sites"
    assert got.attributes["tenant.id"] == tenant
    assert got.attributes["rpc.method"] == "GetSite"
    assert got.attributes["rpc.grpc.status_code"] == code.value[0]
    assert got.status_code != 2  # STATUS_CODE_ERROR: a client's mistake is not the server failing


def test_the_gateway_passes_the_callers_traceparent_to_the_service(
    stack: Stack,
    collector: tuple[Collector, str],
    traced: Callable[..., ExtraService],
    tenant_pair: tuple[str, str],
    token: Callable[..., str],
    eventually: Callable[..., Any],
) -> None:
    receiver, _ = collector
    sites = traced("sites")
    instance = f"gateway-{uuid.uuid4().hex[:6]}"
    settings = stack.start_gateway(
        instance=instance,
        extra_env={
            "SITES_TARGET": sites.target,
            "GATEWAY_PORT": str(free_port()),
            "GATEWAY_ADMIN_PORT": str(free_port()),
        },
    )
    try:
        tenant, _ = tenant_pair
        header, trace_id, client_span = traceparent()
        options = [("grpc.default_authority", f"{tenant}.localhost")]
        with grpc.insecure_channel(f"127.0.0.1:{settings.port}", options=options) as channel:
            sites_grpc.SiteServiceStub(channel).ListSites(
                sites_pb.ListSitesRequest(), metadata=bearer(token(tenant), traceparent=header), timeout=10
            )
    finally:
        stack.stop(instance)

    def span() -> ExportedSpan:
        spans = receiver.in_trace(trace_id)
        assert spans
        return spans[0]

    got = eventually(span, within=10.0, interval=0.1)
    assert (got.service, got.name) == ("towerco-sites", "towerco.sites.v1.SiteService/ListSites")
    assert got.parent_span_id == client_span
    assert got.attributes["tenant.id"] == tenant


@pytest.fixture
def in_process_spans() -> Iterator[InMemorySpanExporter]:
    """This test process records its own spans (as a service does) into memory; none after the test."""
    exporter = InMemorySpanExporter()
    tracing.use(TracerProvider(), SimpleSpanProcessor(exporter))
    yield exporter
    tracing.use(None)


async def test_the_audit_relay_delivers_an_event_in_the_trace_of_the_call_that_recorded_it(
    stack: Stack,
    admin_dsn: str,
    scratch_outbox: str,
    collector: tuple[Collector, str],
    traced: Callable[..., ExtraService],
    in_process_spans: InMemorySpanExporter,
    eventually: Callable[..., Any],
) -> None:
    receiver, _ = collector
    audit_service = traced("audit")
    identity = ServiceIdentity.from_file(
        "sites", issuer=DEFAULT_SERVICE_JWT_ISSUER, audience=DEFAULT_JWT_AUDIENCE,
        key_file=str(stack.keys_dir / "service-signing-key.pem"), kid=DEV_SERVICE_KEY_ID,
    )  # fmt: skip
    db = await Database.connect(admin_dsn, min_size=1, max_size=2)
    relay = AuditRelay(db, scratch_outbox, audit_service.target, identity, service="sites")
    auditor = Auditor(db, scratch_outbox, relay)
    tenant = f"trace_{uuid.uuid4().hex[:10]}"
    origins = []
    try:
        # Two calls record an event each; the relay sends both in one batch, later, on its own.
        for name in ("first", "second"):
            with tracing.server_span(f"/test.Origin/{name}", f"origin-{name}", {}) as (span, _):
                await auditor.record_alone(audit.event("trace.test", f"trace/{name}", tenant_id=tenant))
                origins.append(span.get_span_context())
        assert await relay.deliver_once() == 2
    finally:
        await relay.close()
        await db.close()

    (delivery,) = [s for s in in_process_spans.get_finished_spans() if s.name == "audit.relay"]
    assert delivery.context is not None and delivery.parent is not None
    # The batch continues the first call's trace and links the second's.
    assert (delivery.context.trace_id, delivery.parent.span_id) == (origins[0].trace_id, origins[0].span_id)
    assert [(link.context.trace_id, link.context.span_id) for link in delivery.links] == [
        (origins[1].trace_id, origins[1].span_id)
    ]

    def written() -> ExportedSpan:
        spans = [s for s in receiver.in_trace(format(origins[0].trace_id, "032x")) if s.name.endswith("/WriteEvents")]
        assert spans
        return spans[0]

    write = eventually(written, within=10.0, interval=0.1)
    assert write.service == "towerco-audit"
    assert write.parent_span_id == format(delivery.context.span_id, "016x")


def test_a_browser_may_send_its_traceparent_through_the_gateway(gateway: GatewaySettings) -> None:
    origin = f"http://acme.localhost:{gateway.port}"
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        connection.request(
            "OPTIONS",
            "/towerco.sites.v1.SiteService/ListSites",
            headers={
                "Host": f"acme.localhost:{gateway.port}",
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type,x-grpc-web,traceparent,tracestate",
            },
        )
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    assert response.status in (200, 204)
    allowed = {h.strip() for h in (response.getheader("access-control-allow-headers") or "").split(",")}
    assert {"traceparent", "tracestate"} <= allowed


def test_an_outgoing_call_carries_the_current_trace_and_never_a_stale_one(
    in_process_spans: InMemorySpanExporter,
) -> None:
    stale = traceparent()[0]
    assert propagation_metadata([("traceparent", stale), ("k", "v")]) == [("k", "v")]  # outside any call
    header, trace_id, _ = traceparent()
    with tracing.server_span("/test.Origin/Call", "req-1", {"traceparent": header}) as (span, _):
        sent = dict(propagation_metadata([("traceparent", stale), ("tracestate", "x=1")]))
        own = format(span.get_span_context().span_id, "016x")
    assert "tracestate" not in sent
    assert sent["traceparent"] == f"00-{trace_id}-{own}-01"
