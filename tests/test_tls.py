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
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc

from deploy.kubernetes import render as kubernetes
from deploy.local.certs import LocalTls, ensure_certificates
from deploy.local.grpcurl import gateway_flags
from deploy.local.redis_server import start_redis, stop_redis
from deploy.local.stack import SERVICE_ORDER, Stack
from deploy.local.tokens import ensure_keys
from gateway.__main__ import deploy_settings, overlay_values
from gateway.config import GatewaySettings, render, render_json
from gateway.envoy import validate
from services.runtime.settings import SettingsError
from services.runtime.tls import GrpcTls

from .grpcweb import frame, parse
from .support import bearer, expect_error, free_port

LIST_SITES = "/towerco.sites.v1.SiteService/ListSites"
REPO = Path(__file__).resolve().parents[1]
GRPCURL = Path(sys.executable).parent / "grpcurl"


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


def test_grpcurl_with_the_banners_flags_calls_the_tls_gateway(world, new_tenant, token):
    """What ``make run`` prints once ``make certs`` was run: ``-cacert`` instead of ``-plaintext``."""
    tenant = new_tenant("tlscurl")
    result = subprocess.run(
        [
            str(GRPCURL),
            *gateway_flags(str(world.tls.ca_cert)),
            "-authority",
            f"{tenant}.localhost",
            "-H",
            f"authorization: Bearer {token(tenant)}",
            "-d",
            "{}",
            "-max-time",
            "20",
            f"127.0.0.1:{world.gateway.port}",
            "towerco.sites.v1.SiteService/ListSites",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {}


# What needs no server


def test_make_certs_keeps_its_ca_and_makes_the_pair_again_for_another_domain(tmp_path):
    first = ensure_certificates(tmp_path, "localhost")
    ca, pair = first.ca_cert.read_bytes(), first.cert.read_bytes()
    assert ensure_certificates(tmp_path, "localhost").cert.read_bytes() == pair, "a current pair is kept"
    again = ensure_certificates(tmp_path, "aiops.example.test")
    assert again.ca_cert.read_bytes() == ca, "clients that trust the CA keep trusting it"
    cert = x509.load_pem_x509_certificate(again.cert.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName)[:2] == ["localhost", "*.aiops.example.test"]
    assert "tenant_a.aiops.example.test" in names.get_values_for_type(x509.DNSName), "a demo host, named"
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert {path.stat().st_mode & 0o777 for path in (again.key, again.ca_key)} == {0o600}


def test_half_a_tls_pair_or_a_missing_file_is_refused_at_start_up(tmp_path):
    tls = ensure_certificates(tmp_path, "localhost")
    with pytest.raises(SettingsError, match="GRPC_TLS_CERT_FILE and GRPC_TLS_KEY_FILE"):
        GrpcTls.from_env({"GRPC_TLS_CERT_FILE": str(tls.cert)})
    with pytest.raises(SettingsError, match=r"GRPC_TLS_CA_FILE /nowhere/ca\.crt does not exist"):
        GrpcTls.from_env({"GRPC_TLS_CA_FILE": "/nowhere/ca.crt"})
    with pytest.raises(SettingsError, match="GATEWAY_TLS_CERT_FILE and GATEWAY_TLS_KEY_FILE"):
        GatewaySettings.from_env({"DATA_DIR": str(tmp_path), "GATEWAY_TLS_KEY_FILE": str(tls.key)})
    assert GrpcTls.from_env({}).server_credentials() is None and GrpcTls().channel_credentials() is None


def test_without_a_certificate_the_gateway_stays_plaintext(tmp_path):
    ensure_keys(tmp_path / "keys")
    config = render(GatewaySettings.from_env({"DATA_DIR": str(tmp_path), "GATEWAY_WEB_DIR": "/none"}))
    (listener,) = config["static_resources"]["listeners"]
    assert "transport_socket" not in listener["filter_chains"][0]
    assert [f["name"] for f in listener["listener_filters"]] == ["envoy.filters.listener.http_inspector"]
    assert not any("transport_socket" in cluster for cluster in config["static_resources"]["clusters"])


def test_envoy_validates_the_tls_rendering(tmp_path):
    ensure_keys(tmp_path / "keys")
    tls = ensure_certificates(tmp_path / "tls", "localhost")
    env = {
        "DATA_DIR": str(tmp_path),
        "GATEWAY_WEB_DIR": "/none",
        **tls.gateway_env(),
        "GATEWAY_UPSTREAM_TLS_CA_FILE": str(tls.ca_cert),
        "SITES_TARGET": "sites-headless.towerco.svc:50052",
    }
    settings = GatewaySettings.from_env(env)
    assert settings.cors_origins == (f"https://*.localhost:{settings.port}",), "a TLS gateway's pages are https"
    path = tmp_path / "envoy.json"
    path.write_text(render_json(settings))
    assert f"configuration '{path}' OK" in validate(path)
    sites = next(c for c in render(settings)["static_resources"]["clusters"] if c["name"] == "sites")
    upstream = sites["transport_socket"]["typed_config"]
    assert upstream["sni"] == "sites-headless.towerco.svc"
    assert upstream["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "sites-headless.towerco.svc"}}
    ]


def test_envoy_validates_a_rendering_whose_tls_files_are_only_in_the_cluster(tmp_path):
    """The prod overlay's gateway reads its pair from the mounted Secret, absent here: the
    validation stands a throwaway pair in, and says so."""
    path = tmp_path / "prod.json"
    settings = deploy_settings(overlay_values("prod"))
    assert settings.serves_tls and not Path(settings.tls_cert_file).exists()
    path.write_text(render_json(settings))
    output = validate(path)
    assert f"configuration '{path}' OK" in output
    assert f"checked with a stand-in pair: {settings.tls_cert_file}, {settings.tls_key_file}" in output


def test_the_prod_overlay_mounts_the_gateways_tls_secret_where_its_configuration_reads_it():
    objects = [o for o in yaml.safe_load_all(kubernetes.render("prod")) if o]
    values = overlay_values("prod")
    secrets = [o for o in objects if o["kind"] == "Secret"]
    (secret,) = [o for o in secrets if o["metadata"]["name"].startswith("towerco-gateway-tls")]
    assert secret["type"] == "kubernetes.io/tls" and set(secret["data"]) == {"tls.crt", "tls.key"}
    (gateway,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "gateway"]
    spec = gateway["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v.get("secret", {}).get("secretName") == secret["metadata"]["name"]]
    (container,) = spec["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert values["GATEWAY_TLS_CERT_FILE"] == f"{mount['mountPath']}/tls.crt"
    assert values["GATEWAY_TLS_KEY_FILE"] == f"{mount['mountPath']}/tls.key"
    assert {container[p]["httpGet"]["scheme"] for p in ("readinessProbe", "livenessProbe")} == {"HTTPS"}
    (service,) = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "gateway"]
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(443, "http")]
