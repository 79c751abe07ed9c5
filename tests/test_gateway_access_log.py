"""The gateway's access log: one line per call with the tenant, the request id and the gRPC status code.

The session's Envoy writes it to test-output/logs/gateway.log (with other runs' lines: each
call here carries a request id of its own, and its line is found by it).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc

from gateway.config import GatewaySettings

from .grpcweb import call
from .support import bearer

LIST_SITES = "/towerco.sites.v1.SiteService/ListSites"
GET_SITE = "/towerco.sites.v1.SiteService/GetSite"
GATEWAY_LOG = Path(__file__).resolve().parents[1] / "test-output" / "logs" / "gateway.log"


def _line(request_id: str, within: float = 5.0) -> str:
    """The access log line of the call with ``request_id`` (Envoy writes it when the call ends)."""
    deadline = time.monotonic() + within
    while True:
        lines = [line for line in GATEWAY_LOG.read_text(errors="replace").splitlines() if request_id in line]
        if lines or time.monotonic() >= deadline:
            assert len(lines) == 1, f"{len(lines)} access log lines with request id {request_id}"
            return lines[0]
        time.sleep(0.05)


def _fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", line))


def test_each_native_grpc_call_has_a_line_with_its_tenant_request_id_and_grpc_status(
    gateway: GatewaySettings, new_tenant: Callable[..., str], token: Callable[..., str]
) -> None:
    tenant = new_tenant()
    listed, missing = f"log-ok-{uuid.uuid4().hex}", f"log-nf-{uuid.uuid4().hex}"
    options = [("grpc.default_authority", f"{tenant}.localhost")]
    with grpc.insecure_channel(f"127.0.0.1:{gateway.port}", options=options) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        stub.ListSites(sites_pb.ListSitesRequest(), metadata=bearer(token(tenant), **{"x-request-id": listed}))
        try:
            stub.GetSite(
                sites_pb.GetSiteRequest(site_id="NO-SUCH-SITE"),
                metadata=bearer(token(tenant), **{"x-request-id": missing}),
                timeout=10,
            )
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
        else:
            raise AssertionError("GetSite of a missing site succeeded")

    ok = _fields(_line(listed))
    assert (ok["tenant"], ok["request_id"], ok["grpc_status"]) == (tenant, listed, "0"), ok
    not_found = _fields(_line(missing))
    assert (not_found["tenant"], not_found["request_id"], not_found["grpc_status"]) == (tenant, missing, "5")


def test_a_call_the_gateway_refuses_has_its_grpc_status_too(gateway: GatewaySettings) -> None:
    refused = f"log-unauth-{uuid.uuid4().hex}"
    options = [("grpc.default_authority", "tenant_a.localhost")]
    with grpc.insecure_channel(f"127.0.0.1:{gateway.port}", options=options) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        try:
            stub.ListSites(sites_pb.ListSitesRequest(), metadata=(("x-request-id", refused),), timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
    line = _fields(_line(refused))
    assert (line["request_id"], line["grpc_status"]) == (refused, "16"), line


def test_a_grpc_web_call_has_its_line_and_an_error_its_status_but_an_ok_no_false_one(
    gateway: GatewaySettings, new_tenant: Callable[..., str], token: Callable[..., str]
) -> None:
    tenant = new_tenant()
    listed, missing = f"log-web-ok-{uuid.uuid4().hex}", f"log-web-nf-{uuid.uuid4().hex}"
    host = f"{tenant}.localhost:{gateway.port}"
    ok = call(
        gateway.port,
        host,
        LIST_SITES,
        sites_pb.ListSitesRequest(),
        token=token(tenant),
        headers={"X-Request-Id": listed},
    )
    assert ok.status == 0
    not_found = call(
        gateway.port,
        host,
        GET_SITE,
        sites_pb.GetSiteRequest(site_id="NO-SUCH-SITE"),
        token=token(tenant),
        headers={"X-Request-Id": missing},
    )
    assert not_found.status == 5
    # The OK's status travels in the body, which Envoy does not read: "-", not a made-up UNKNOWN.
    line = _fields(_line(listed))
    assert (line["tenant"], line["request_id"], line["grpc_status"]) == (tenant, listed, "-"), line
    line = _fields(_line(missing))
    assert (line["tenant"], line["request_id"], line["grpc_status"]) == (tenant, missing, "5"), line
