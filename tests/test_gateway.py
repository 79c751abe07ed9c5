"""The API gateway, through the running Envoy: gRPC-web and gRPC, JWT at the edge, the
tenant from the subdomain, CORS, and errors a gRPC-web client can read.

Calls go to the real Envoy on the session's gateway port with the Host (gRPC-web) or
``:authority`` (gRPC, grpcurl) a browser or operator would use: ``<tenant>.localhost``.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.api import field_behavior_pb2
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb

from gateway.config import GatewaySettings
from services.runtime.ids import REQUEST_ID

from .grpcweb import Reply, call, frame, parse
from .support import RichError, bearer, expect_error, free_port
from .test_audit_trail import events_for

pytestmark = pytest.mark.stack

REPO = Path(__file__).resolve().parents[1]
GRPCURL = Path(sys.executable).parent / "grpcurl"
#: Where googleapis-common-protos keeps google/api/field_behavior.proto, which the protos import.
GOOGLEAPIS_PROTOS = Path(field_behavior_pb2.__file__).parents[2]
LIST_SITES = "/towerco.sites.v1.SiteService/ListSites"
GET_SITE = "/towerco.sites.v1.SiteService/GetSite"
CREATE_SITE = "/towerco.sites.v1.SiteService/CreateSite"
GET_BRANDING = "/towerco.tenant.v1.TenantRegistryService/GetBranding"
UNAUTHENTICATED, PERMISSION_DENIED, UNIMPLEMENTED, DEADLINE_EXCEEDED, UNAVAILABLE = 16, 7, 12, 4, 14


@pytest.fixture
def pair(tenant_pair: tuple[str, str], sites, token: Callable[..., str]) -> tuple[str, str]:
    """Two tenants with two sites each, made straight at the sites service."""
    for tenant in tenant_pair:
        for n in (1, 2):
            sites.CreateSite(
                sites_pb.CreateSiteRequest(
                    site_id=f"GW-{tenant[:2].upper()}-{n}", site=sites_pb.Site(name=f"{tenant} {n}")
                ),
                metadata=bearer(token(tenant)),
                timeout=10,
            )
    return tenant_pair


def host(settings: GatewaySettings, tenant: str) -> str:
    return f"{tenant}.localhost:{settings.port}"


def listed(reply: Reply) -> list[str]:
    return sorted(site.site_id for site in reply.one(sites_pb.ListSitesResponse).sites)


def test_grpc_web_call_with_token_on_its_subdomain_succeeds(gateway, pair, token):
    tenant_a, _ = pair
    reply = call(gateway.port, host(gateway, tenant_a), LIST_SITES, sites_pb.ListSitesRequest(), token=token(tenant_a))
    assert reply.http_status == 200
    assert reply.headers["content-type"].startswith("application/grpc-web")
    assert listed(reply) == ["GW-TA-1", "GW-TA-2"]
    assert reply.trailers.get("x-request-id"), "the service's request id reaches the browser"


def test_a_spoofed_tenant_header_is_replaced_by_the_subdomains_tenant(gateway, pair, token):
    tenant_a, tenant_b = pair
    # Straight at a service, this header would be a cross-tenant attempt and refused; through
    # the gateway it never arrives: the subdomain's tenant is what the service sees.
    spoof = {"X-Tenant-Id": tenant_b, "X-Towerco-Caller": "platform", "X-Jwt-Payload": "e30"}
    reply = call(
        gateway.port,
        host(gateway, tenant_a),
        LIST_SITES,
        sites_pb.ListSitesRequest(),
        token=token(tenant_a),
        headers=spoof,
    )
    assert listed(reply) == ["GW-TA-1", "GW-TA-2"]
    created = call(
        gateway.port,
        host(gateway, tenant_a),
        CREATE_SITE,
        sites_pb.CreateSiteRequest(site_id="GW-SPOOF", site=sites_pb.Site(name="spoofed header")),
        token=token(tenant_a),
        headers=spoof,
    ).one(sites_pb.Site)
    assert created.site_id == "GW-SPOOF"
    again = call(gateway.port, host(gateway, tenant_a), LIST_SITES, sites_pb.ListSitesRequest(), token=token(tenant_a))
    assert "GW-SPOOF" in listed(again)
    other = call(gateway.port, host(gateway, tenant_b), LIST_SITES, sites_pb.ListSitesRequest(), token=token(tenant_b))
    assert "GW-SPOOF" not in listed(other)


def test_a_token_on_another_tenants_subdomain_is_permission_denied(gateway, pair, token):
    tenant_a, tenant_b = pair
    reply = call(gateway.port, host(gateway, tenant_b), LIST_SITES, sites_pb.ListSitesRequest(), token=token(tenant_a))
    assert reply.status == PERMISSION_DENIED, reply
    assert reply.info is not None and reply.info.reason == "CROSS_TENANT_DENIED"
    assert reply.messages == []


@pytest.mark.parametrize("problem", ["missing", "expired", "foreign signature", "wrong audience", "garbage"])
def test_a_missing_or_bad_token_is_unauthenticated_at_the_edge(gateway, pair, token, problem):
    tenant_a, _ = pair
    bad = {
        "missing": None,
        "expired": token(tenant_a, ttl=-120),
        "foreign signature": _foreign_token(tenant_a),
        "wrong audience": token(tenant_a, aud="someone-else"),
        "garbage": "not.a.jwt",
    }[problem]
    reply = call(gateway.port, host(gateway, tenant_a), LIST_SITES, sites_pb.ListSitesRequest(), token=bad)
    assert reply.status == UNAUTHENTICATED, (reply.status, reply.message)
    assert reply.http_status == 200, "gRPC-web clients read grpc-status only from an HTTP 200"
    assert reply.message, "a person can read why"
    expected = {"missing": "TOKEN_MISSING", "expired": "TOKEN_EXPIRED"}.get(problem, "TOKEN_INVALID")
    assert reply.info is not None and (reply.info.reason, reply.info.domain) == (expected, "gateway.towerco")
    assert reply.messages == []


def _foreign_token(tenant: str) -> str:
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims: dict[str, Any] = {"sub": "mallory", "tenant_id": tenant, "role": "admin"}
    claims |= {"iss": "towerco-dev-issuer", "aud": "towerco-aiops", "exp": int(time.time()) + 300}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "towerco-dev-1"})


def test_without_a_tenant_subdomain_only_public_rpcs_pass(gateway, pair, token):
    tenant_a, _ = pair
    bare = f"localhost:{gateway.port}"
    refused = call(gateway.port, bare, LIST_SITES, sites_pb.ListSitesRequest(), token=token(tenant_a))
    assert refused.status == PERMISSION_DENIED
    assert refused.info is not None and refused.info.reason == "TENANT_SUBDOMAIN_REQUIRED"
    assert "<tenant>.localhost" in refused.message
    for odd in (f"x.localhost:{gateway.port}", f"{tenant_a}.localhost.evil.example", f"a.{tenant_a}.localhost"):
        reply = call(gateway.port, odd, LIST_SITES, sites_pb.ListSitesRequest(), token=token(tenant_a))
        assert reply.status == PERMISSION_DENIED, odd
    branding = call(gateway.port, bare, GET_BRANDING, tenant_pb.GetBrandingRequest(tenant_id=tenant_a))
    assert branding.one(tenant_pb.Branding).display_name


def test_branding_is_public_on_the_tenants_subdomain(gateway, new_tenant):
    tenant = new_tenant("gwb", display_name="Kilimanjaro Towers")
    reply = call(
        gateway.port, host(gateway, tenant), GET_BRANDING, tenant_pb.GetBrandingRequest(host=f"{tenant}.localhost")
    )
    branding = reply.one(tenant_pb.Branding)
    assert branding.display_name == "Kilimanjaro Towers"
    assert branding.primary_color == "#3B82F6"


def test_internal_services_are_not_routed(gateway, pair, platform_token):
    reply = call(
        gateway.port,
        f"platform.localhost:{gateway.port}",
        "/towerco.internal.v1.TenantDirectoryService/GetTenantState",
        tenant_pb.GetTenantRequest(),
        token=platform_token,
    )
    assert reply.status == UNIMPLEMENTED, (reply.status, reply.message)


def test_resource_exhausted_reaches_a_grpc_web_client_with_retry_details(
    gateway, new_tenant, token, features, platform_token
):
    from towerco.features.v1 import feature_gate_service_pb2 as features_pb

    tenant = new_tenant("gwr", plan="basic")
    features.SetLimitOverride(
        features_pb.SetLimitOverrideRequest(tenant_id=tenant, resource="rpm_read", limit=6),
        metadata=bearer(platform_token),
        timeout=10,
    )
    tenant_token = token(tenant)
    statuses = []
    for _ in range(20):
        reply = call(gateway.port, host(gateway, tenant), LIST_SITES, sites_pb.ListSitesRequest(), token=tenant_token)
        statuses.append(reply.status)
        if reply.status != 0:
            break
    assert reply.status == 8, statuses  # RESOURCE_EXHAUSTED
    assert reply.info is not None and reply.info.reason == "RATE_LIMITED"
    assert int(reply.trailers.get("retry-after-ms", reply.headers.get("retry-after-ms", "0"))) > 0


def test_grpc_web_over_http2_is_served_too(gateway, pair, token, tmp_path):
    """curl (nghttp2) speaks HTTP/2 without TLS, as a browser behind a TLS-terminating proxy would."""
    tenant_a, _ = pair
    body = tmp_path / "request.bin"
    body.write_bytes(frame(sites_pb.ListSitesRequest()))
    headers_file, out = tmp_path / "headers.txt", tmp_path / "response.bin"
    command = [
        "curl", "--silent", "--show-error", "--http2-prior-knowledge", "--max-time", "10",
        "-H", f"Host: {host(gateway, tenant_a)}",
        "-H", "Content-Type: application/grpc-web+proto",
        "-H", "X-Grpc-Web: 1",
        "-H", f"Authorization: Bearer {token(tenant_a)}",
        "--data-binary", f"@{body}", "-D", str(headers_file), "-o", str(out),
        f"http://127.0.0.1:{gateway.port}{LIST_SITES}",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=30)
    lines = headers_file.read_text().splitlines()
    assert lines[0].startswith("HTTP/2 200"), lines
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    reply = parse(200, headers, out.read_bytes())
    assert listed(reply) == ["GW-TA-1", "GW-TA-2"]


def _native(settings: GatewaySettings, tenant: str, method: str, request: Any, token: str) -> RichError:
    """One native gRPC call through the gateway on ``tenant``'s subdomain, expected to fail."""
    options = [("grpc.default_authority", f"{tenant}.localhost")]
    with grpc.insecure_channel(f"127.0.0.1:{settings.port}", options=options) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        return expect_error(getattr(stub, method), request, metadata=bearer(token))


def test_a_slow_or_missing_upstream_is_the_same_answer_to_grpc_web_and_native_grpc(
    stack, extra_service, new_tenant, token
):
    """Errors Envoy makes itself when a service is slow or gone, as gRPC-web and native gRPC
    clients see them: the same status, message, ErrorInfo and RetryInfo (not Envoy's text)."""
    slow = extra_service("sites", env={"FAULT_POINTS": "sites.analytics@3"})
    ports = {"GATEWAY_PORT": str(free_port()), "GATEWAY_ADMIN_PORT": str(free_port())}
    env = {**ports, "SITES_TARGET": slow.target, "GATEWAY_ROUTE_TIMEOUT_SECONDS": "1", "GATEWAY_WEB_DIR": "/none"}
    settings = stack.start_gateway(extra_env=env, instance="gateway-slow")
    try:
        tenant = new_tenant("gws", plan="professional")  # GetSiteAnalytics is in the plan
        analytics = "/towerco.sites.v1.SiteService/GetSiteAnalytics"
        started = time.monotonic()
        reply = call(
            settings.port, host(settings, tenant), analytics, sites_pb.GetSiteAnalyticsRequest(), token=token(tenant)
        )
        assert (reply.http_status, reply.status) == (200, DEADLINE_EXCEEDED), (reply.status, reply.message)
        assert "1s" in reply.message
        assert reply.info is not None and reply.info.reason == "GATEWAY_TIMEOUT"
        assert time.monotonic() - started < 2.5, "the route timeout (1 s) ended the call, not the service's 3 s"
        native = _native(settings, tenant, "GetSiteAnalytics", sites_pb.GetSiteAnalyticsRequest(), token(tenant))
        assert (native.code, native.message, native.reason) == (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            reply.message,
            "GATEWAY_TIMEOUT",
        )
        slow.process.terminate()
        slow.process.wait(10)
        reply = call(
            settings.port, host(settings, tenant), LIST_SITES, sites_pb.ListSitesRequest(), token=token(tenant)
        )
        assert (reply.http_status, reply.status) == (200, UNAVAILABLE), (reply.status, reply.message)
        assert reply.info is not None and reply.info.reason == "SERVICE_UNAVAILABLE"
        assert reply.retry is not None and reply.retry.retry_delay.seconds == 1
        native = _native(settings, tenant, "ListSites", sites_pb.ListSitesRequest(), token(tenant))
        assert (native.code, native.message) == (grpc.StatusCode.UNAVAILABLE, reply.message), native.message
        assert native.info is not None and (native.info.reason, native.info.domain) == (
            "SERVICE_UNAVAILABLE",
            "gateway.towerco",
        )
        assert native.retry is not None and native.retry.retry_delay.seconds == 1
    finally:
        stack.stop("gateway-slow")


def test_a_call_a_gone_host_cannot_take_is_retried_on_another(stack, extra_service, pair, token):
    """Two sites processes behind the gateway; one dies. Calls that meet it are not lost:
    it was never reached, so the gateway tries them on the other."""
    tenant_a, _ = pair
    doomed, survivor = extra_service("sites"), extra_service("sites")
    env = {
        "GATEWAY_PORT": str(free_port()),
        "GATEWAY_ADMIN_PORT": str(free_port()),
        "SITES_TARGET": f"{doomed.target},{survivor.target}",
        "GATEWAY_WEB_DIR": "/none",
    }
    settings = stack.start_gateway(extra_env=env, instance="gateway-two-sites")
    try:
        for _ in range(4):  # both hosts in use
            reply = call(
                settings.port, host(settings, tenant_a), LIST_SITES, sites_pb.ListSitesRequest(), token=token(tenant_a)
            )
            assert listed(reply) == ["GW-TA-1", "GW-TA-2"]
        doomed.process.kill()
        doomed.process.wait(10)
        # Before health checks or outlier detection take it out, round robin still picks it.
        statuses = [
            call(
                settings.port, host(settings, tenant_a), LIST_SITES, sites_pb.ListSitesRequest(), token=token(tenant_a)
            ).status
            for _ in range(10)
        ]
        assert statuses == [0] * 10, statuses
    finally:
        stack.stop("gateway-two-sites")


def test_a_missing_token_is_the_same_answer_to_native_grpc_as_to_grpc_web(gateway, pair):
    tenant_a, _ = pair
    web = call(gateway.port, host(gateway, tenant_a), LIST_SITES, sites_pb.ListSitesRequest())
    options = [("grpc.default_authority", f"{tenant_a}.localhost")]
    with grpc.insecure_channel(f"127.0.0.1:{gateway.port}", options=options) as channel:
        native = expect_error(sites_grpc.SiteServiceStub(channel).ListSites, sites_pb.ListSitesRequest())
    assert (native.code, native.message) == (grpc.StatusCode.UNAUTHENTICATED, web.message)
    assert native.info is not None and (native.info.reason, native.info.domain) == ("TOKEN_MISSING", "gateway.towerco")


# Request ids


@pytest.mark.parametrize("sent", ["web-7f3a.b2:c_d-e", "x" * 64])
def test_a_well_formed_client_request_id_is_kept_end_to_end(gateway, pair, token, sent):
    tenant_a, _ = pair
    reply = call(
        gateway.port,
        host(gateway, tenant_a),
        LIST_SITES,
        sites_pb.ListSitesRequest(),
        token=token(tenant_a),
        headers={"X-Request-Id": sent},
    )
    assert reply.status == 0
    # The service's own trailer: the id it logged and audited is the client's.
    assert reply.trailers["x-request-id"] == sent
    options = [("grpc.default_authority", f"{tenant_a}.localhost")]
    with grpc.insecure_channel(f"127.0.0.1:{gateway.port}", options=options) as channel:
        _, native = sites_grpc.SiteServiceStub(channel).ListSites.with_call(
            sites_pb.ListSitesRequest(), metadata=bearer(token(tenant_a), **{"x-request-id": sent}), timeout=10
        )
        assert dict(native.trailing_metadata())["x-request-id"] == sent


@pytest.mark.parametrize("sent", [None, "", "x" * 65, "has space", "semi;colon", "ünïcode", "-" * 100])
def test_a_missing_or_malformed_client_request_id_is_replaced_by_a_fresh_one(gateway, pair, token, sent):
    tenant_a, _ = pair
    headers = {} if sent is None else {"X-Request-Id": sent.encode().decode("latin-1")}
    reply = call(
        gateway.port,
        host(gateway, tenant_a),
        LIST_SITES,
        sites_pb.ListSitesRequest(),
        token=token(tenant_a),
        headers=headers,
    )
    made = reply.trailers["x-request-id"]
    assert made != sent and REQUEST_ID.matches(made), made
    assert reply.headers["x-request-id"] == made, "the gateway's header and the service's trailer agree"
    if sent is not None and sent.isascii():
        options = [("grpc.default_authority", f"{tenant_a}.localhost")]
        with grpc.insecure_channel(f"127.0.0.1:{gateway.port}", options=options) as channel:
            _, native = sites_grpc.SiteServiceStub(channel).ListSites.with_call(
                sites_pb.ListSitesRequest(), metadata=bearer(token(tenant_a), **{"x-request-id": sent}), timeout=10
            )
            again = str(dict(native.trailing_metadata())["x-request-id"])
            assert again != sent and REQUEST_ID.matches(again), again


def test_an_error_the_gateway_makes_carries_the_clients_request_id(gateway, pair):
    tenant_a, _ = pair
    reply = call(
        gateway.port,
        host(gateway, tenant_a),
        LIST_SITES,
        sites_pb.ListSitesRequest(),
        headers={"X-Request-Id": "no-token-call-1"},
    )
    assert reply.status == UNAUTHENTICATED
    assert reply.headers.get("x-request-id") == "no-token-call-1"


# CORS


def _preflight(settings: GatewaySettings, origin: str, tenant: str) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", settings.port, timeout=10)
    connection.request(
        "OPTIONS",
        LIST_SITES,
        headers={
            "Host": host(settings, tenant),
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,x-grpc-web,x-user-agent,x-request-id",
        },
    )
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def test_cors_preflight_from_an_allowed_origin_passes_without_a_token(gateway, pair):
    tenant_a, _ = pair
    origin = f"http://{tenant_a}.localhost:{gateway.port}"
    response = _preflight(gateway, origin, tenant_a)
    assert response.status in (200, 204)
    assert response.getheader("access-control-allow-origin") == origin
    allowed = {h.strip() for h in (response.getheader("access-control-allow-headers") or "").split(",")}
    assert {"authorization", "content-type", "x-grpc-web", "x-user-agent", "grpc-timeout", "x-request-id"} <= allowed
    assert "POST" in (response.getheader("access-control-allow-methods") or "")


@pytest.mark.parametrize("origin", ["http://evil.example", "http://localhost.evil.example:{port}", "null"])
def test_cors_preflight_from_another_origin_is_not_allowed(gateway, pair, origin):
    tenant_a, _ = pair
    response = _preflight(gateway, origin.format(port=gateway.port), tenant_a)
    # Without Access-Control-Allow-Origin a browser does not send the call.
    assert response.getheader("access-control-allow-origin") is None
    assert response.getheader("access-control-allow-credentials") is None


def test_an_allowed_origins_response_exposes_the_grpc_status(gateway, pair, token):
    tenant_a, _ = pair
    origin = f"http://{tenant_a}.localhost:{gateway.port}"
    reply = call(
        gateway.port, host(gateway, tenant_a), LIST_SITES, sites_pb.ListSitesRequest(), headers={"Origin": origin}
    )
    assert reply.status == UNAUTHENTICATED  # an edge refusal still carries CORS headers
    assert reply.headers.get("access-control-allow-origin") == origin
    exposed = {h.strip() for h in reply.headers.get("access-control-expose-headers", "").split(",")}
    assert {"grpc-status", "grpc-message"} <= exposed


# gRPC over HTTP/2 and grpcurl


def test_native_grpc_through_the_gateway_uses_the_authority(gateway, pair, token):
    tenant_a, tenant_b = pair
    options = [("grpc.default_authority", f"{tenant_a}.localhost")]
    with grpc.insecure_channel(f"127.0.0.1:{gateway.port}", options=options) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        reply = stub.ListSites(
            sites_pb.ListSitesRequest(), metadata=bearer(token(tenant_a), tenant=tenant_b), timeout=10
        )
        assert sorted(s.site_id for s in reply.sites) == ["GW-TA-1", "GW-TA-2"]
        error = expect_error(stub.ListSites, sites_pb.ListSitesRequest(), metadata=bearer(token(tenant_b)))
        assert error.code == grpc.StatusCode.PERMISSION_DENIED
        error = expect_error(stub.ListSites, sites_pb.ListSitesRequest())
        assert error.code == grpc.StatusCode.UNAUTHENTICATED


def _grpcurl(settings: GatewaySettings, tenant: str, token: str, method: str, data: dict[str, Any]) -> dict[str, Any]:
    command = [
        str(GRPCURL),
        "-plaintext",
        "-import-path",
        str(REPO / "protos"),
        "-import-path",
        str(GOOGLEAPIS_PROTOS),
        "-proto",
        "towerco/sites/v1/sites_service.proto",
        "-authority",
        f"{tenant}.localhost",
        "-H",
        f"authorization: Bearer {token}",
        "-d",
        json.dumps(data),
        f"127.0.0.1:{settings.port}",
        f"towerco.sites.v1.SiteService/{method}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def test_grpcurl_through_the_gateway_lists_and_reads_sites(gateway, pair, token):
    tenant_a, _ = pair
    listing = _grpcurl(gateway, tenant_a, token(tenant_a), "ListSites", {"pageSize": 10})
    assert sorted(site["siteId"] for site in listing["sites"]) == ["GW-TA-1", "GW-TA-2"]
    site = _grpcurl(gateway, tenant_a, token(tenant_a), "GetSite", {"siteId": "GW-TA-1"})
    assert site["name"] == f"{tenant_a} 1"


async def test_the_audit_log_records_the_client_address_the_gateway_saw(gateway, pair, token, admin):
    tenant_a, _ = pair
    site_id = f"GW-XFF-{uuid.uuid4().hex[:6]}"
    reply = call(
        gateway.port,
        host(gateway, tenant_a),
        CREATE_SITE,
        sites_pb.CreateSiteRequest(site_id=site_id, site=sites_pb.Site(name="Audited via gateway")),
        token=token(tenant_a),
        headers={"X-Forwarded-For": "198.51.100.9"},
    )
    reply.one(sites_pb.Site)
    (event,) = await events_for(admin, tenant_a, reply.trailers["x-request-id"])
    # The client's own x-forwarded-for is not believed: the address is the one Envoy appended,
    # this machine's (for a loopback peer Envoy writes its own local address).
    assert event["ip_address"] != "198.51.100.9"
    assert ipaddress.ip_address(event["ip_address"]).is_loopback or event["ip_address"] in _local_addresses()


def _local_addresses() -> set[str]:
    output = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=False).stdout
    return set(output.split())
