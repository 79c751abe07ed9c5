"""TLS at the edge and between the services, with ``make certs``' self-signed CA.

One set of the four services of the module's own serves TLS only and calls each other
over TLS (``GRPC_TLS_*``), on a Redis of its own so no cache answers for them: a tenant's
state and entitlements can only come from the TLS registry and feature gate. A gateway of
its own terminates TLS (``GATEWAY_TLS_*``) and calls them over TLS too
(``GATEWAY_UPSTREAM_TLS_CA_FILE``), its health checks included: it is ready only once
they pass.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc

from deploy.local.certs import LocalTls, ensure_certificates
from deploy.local.redis_server import start_redis, stop_redis
from deploy.local.stack import SERVICE_ORDER, Stack
from gateway.config import GatewaySettings

from .grpcweb import frame, parse
from .support import bearer, expect_error, free_port

pytestmark = pytest.mark.stack

LIST_SITES = "/towerco.sites.v1.SiteService/ListSites"


@dataclass(frozen=True)
class TlsWorld:
    tls: LocalTls
    #: Each service's TLS-only port on loopback.
    ports: dict[str, int]
    gateway: GatewaySettings

    def target(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def trusting(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.tls.ca_cert))

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.tls.ca_cert.read_bytes())


@pytest.fixture(scope="module")
def world(stack: Stack) -> Iterator[TlsWorld]:
    tls = ensure_certificates(stack.config.data_dir / "tls-test", "localhost")
    redis_dir = stack.config.data_dir / "tls-test-redis"
    redis = start_redis(redis_dir, free_port())
    ports = {name: free_port() for name in SERVICE_ORDER}
    addresses = {f"{name.upper()}_TARGET": f"127.0.0.1:{port}" for name, port in ports.items()}
    started: list[str] = []
    try:
        for name in SERVICE_ORDER:
            env = {
                **tls.service_env(),
                **addresses,
                f"{name.upper()}_PORT": str(ports[name]),
                "REDIS_URL": redis.url,
                "MIGRATE_ON_START": "0",
            }
            with (stack.config.data_dir / f"tls-{name}.log").open("ab") as log:
                stack.start_service(name, log=log, extra_env=env, instance=f"tls-{name}")
            started.append(f"tls-{name}")
        for name in SERVICE_ORDER:
            stack.wait_serving(name, port=ports[name], instance=f"tls-{name}")  # over TLS, with the CA
        gateway_env = {
            **tls.gateway_env(),
            **addresses,
            "GATEWAY_UPSTREAM_TLS_CA_FILE": str(tls.ca_cert),
            "GATEWAY_PORT": str(free_port()),
            "GATEWAY_ADMIN_PORT": str(free_port()),
            "GATEWAY_WEB_DIR": "/none",
        }
        with (stack.config.data_dir / "tls-gateway.log").open("ab") as log:
            # Ready only when every cluster has a host that passed its gRPC health check over TLS.
            gateway = stack.start_gateway(log=log, extra_env=gateway_env, instance="tls-gateway")
        started.append("tls-gateway")
        yield TlsWorld(tls, ports, gateway)
    finally:
        for instance in started:
            stack.stop(instance)
        stop_redis(redis_dir)


def _alpn(world: TlsWorld, offered: list[str]) -> str | None:
    context = world.trusting()
    context.set_alpn_protocols(offered)
    with socket.create_connection(("127.0.0.1", world.gateway.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as conn:
            return conn.selected_alpn_protocol()


def test_the_gateway_offers_h2_for_grpc_and_http11_for_grpc_web_by_alpn(world):
    assert _alpn(world, ["h2", "http/1.1"]) == "h2"
    assert _alpn(world, ["http/1.1"]) == "http/1.1"


def test_native_grpc_through_the_tls_gateway_reaches_tls_services(world, new_tenant, token):
    """The client verifies the gateway with the CA (gRPC insists on ALPN h2); the gateway
    calls sites over TLS, and sites asks the TLS registry and feature gate about the new
    tenant (its Redis is empty): the site is created."""
    tenant = new_tenant("tls")
    # gRPC refuses a wildcard right under a top-level name (*.localhost): the server name
    # checked is the certificate's plain name; the authority still names the tenant.
    options = [("grpc.default_authority", f"{tenant}.localhost"), ("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(f"127.0.0.1:{world.gateway.port}", world.credentials(), options=options) as channel:
        created = sites_grpc.SiteServiceStub(channel).CreateSite(
            sites_pb.CreateSiteRequest(site_id="TLS-1", site=sites_pb.Site(name="over TLS")),
            metadata=bearer(token(tenant)),
            timeout=15,
        )
    assert created.site_id == "TLS-1"


def test_grpc_web_over_https_http11(world, new_tenant, token):
    tenant = new_tenant("tlsweb")
    headers = {
        "Host": f"{tenant}.localhost",
        "Content-Type": "application/grpc-web+proto",
        "X-Grpc-Web": "1",
        "Authorization": f"Bearer {token(tenant)}",
    }
    context = world.trusting()
    context.set_alpn_protocols(["http/1.1"])
    connection = http.client.HTTPSConnection("127.0.0.1", world.gateway.port, timeout=15, context=context)
    try:
        connection.request("POST", LIST_SITES, frame(sites_pb.ListSitesRequest()), headers=headers)
        response = connection.getresponse()
        reply = parse(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        assert connection.sock is not None
        assert connection.sock.version() in {"TLSv1.2", "TLSv1.3"}
    finally:
        connection.close()
    assert (reply.http_status, reply.status) == (200, 0), reply.message
    assert list(reply.one(sites_pb.ListSitesResponse).sites) == []


def test_a_client_without_the_ca_fails_verification(world):
    """Neither a gRPC client nor an HTTPS client that trusts only the system's CAs accepts the gateway."""
    with pytest.raises(ssl.SSLCertVerificationError):
        with socket.create_connection(("127.0.0.1", world.gateway.port), timeout=10) as raw:
            ssl.create_default_context().wrap_socket(raw, server_hostname="localhost")
    with grpc.secure_channel(f"127.0.0.1:{world.gateway.port}", grpc.ssl_channel_credentials()) as channel:
        err = expect_error(sites_grpc.SiteServiceStub(channel).ListSites, sites_pb.ListSitesRequest())
    assert err.code == grpc.StatusCode.UNAVAILABLE, err


@pytest.mark.parametrize("name", ["sites", "tenant"])
def test_a_plaintext_client_is_refused_by_a_tls_service(world, name):
    with grpc.insecure_channel(world.target(name)) as channel:
        err = expect_error(health_pb2_grpc.HealthStub(channel).Check, health_pb2.HealthCheckRequest())
    assert err.code == grpc.StatusCode.UNAVAILABLE, err


def test_services_call_each_other_over_tls(world, new_tenant, token):
    """Straight to the TLS sites service: the new tenant's state and plan come from the TLS
    registry and feature gate, which serve nothing in plaintext."""
    tenant = new_tenant("tlsdirect")
    with grpc.secure_channel(world.target("sites"), world.credentials()) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        stub.CreateSite(
            sites_pb.CreateSiteRequest(site_id="TLS-D", site=sites_pb.Site(name="direct")),
            metadata=bearer(token(tenant)),
            timeout=15,
        )
        listed = stub.ListSites(sites_pb.ListSitesRequest(), metadata=bearer(token(tenant)), timeout=15)
    assert [site.site_id for site in listed.sites] == ["TLS-D"]
