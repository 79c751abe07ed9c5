"""The Envoy configuration of the API gateway, generated from one template for dev and deploy.

:func:`render` is the template: one function of :class:`GatewaySettings` that gives the
whole bootstrap. ``make run`` and the tests render it with the dev settings (loopback
upstreams, the dev JWKS file); ``python -m gateway render --deploy`` renders the same
template for the cluster (service DNS names, the identity provider's JWKS URL).

What is routed comes from the services' own proto policies: every public gRPC service is
routed by its ``/package.Service/`` prefix to the process that serves it; internal
services (``towerco.internal.*``) are never routed; public RPCs pass without a token.
"""

from __future__ import annotations

import base64
import importlib
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor, MethodDescriptor, ServiceDescriptor
from google.rpc import error_details_pb2, status_pb2
from towerco.tenant.v1 import tenant_registry_service_pb2

from services.runtime import error_catalogue
from services.runtime.audit import GATEWAY_HEADER
from services.runtime.auth import MAX_TOKEN_BYTES
from services.runtime.environment import SettingsTable, integer, process_environment, text
from services.runtime.error_catalogue import ErrorReason, Reason
from services.runtime.ids import REQUEST_ID, TENANT_ID, IdRule
from services.runtime.interceptors.rate_limit import RATE_SLOT_HEADER
from services.runtime.policy import PolicyTable
from services.runtime.settings import (
    BASE_DOMAIN,
    DATA_DIR,
    DEFAULT_PORTS,
    GATEWAY_SECRET,
    JWT_AUDIENCE,
    JWT_ISSUER,
    JWT_JWKS_FILE,
    JWT_JWKS_URL,
    JWT_LEEWAY_SECONDS,
    PORTS,
    SERVICE_JWT_ISSUER,
    SERVICE_KEY_FILE,
    SERVICE_KEY_ID,
    TARGETS,
    SettingsError,
    data_dir,
    service_targets,
)

from .domains import EDGE_FILTER, ROUTES_FILE, TENANT_KEY, RoutesTemplate
from .domains import route_config as with_domains
from .overload import overload_manager

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EDGE_LUA = HERE / "edge.lua"
GRPC_REPLIES_LUA = HERE / "grpc_replies.lua"
REQUEST_ID_LUA = HERE / "request_id.lua"
PENALTY_BOX_LUA = HERE / "penalty_box.lua"
TENANT_ISSUER_LUA = HERE / "tenant_issuer.lua"
#: The built browser frontend (``make web``), served by the gateway at ``/``.
WEB_DIST = HERE / "web" / "dist"

ERROR_DOMAIN = "gateway.towerco"
#: Headers only the gateway (or a service, on an internal call) may set. A client's copy
#: is removed before anything reads it; so is any header under the internal prefix.
IDENTITY_HEADERS = ("x-tenant-id", "x-jwt-payload", "x-forwarded-client-cert")
INTERNAL_PREFIX = "x-towerco-"
#: Packages whose services are reachable only between services.
INTERNAL_PACKAGE_PREFIX = "towerco.internal."
#: Everything a gRPC-web client sends, and the response headers it must be able to read.
CORS_ALLOW_HEADERS = (
    "authorization, content-type, x-grpc-web, x-user-agent, grpc-timeout, x-request-id, traceparent, tracestate"
)
CORS_EXPOSE_HEADERS = "grpc-status, grpc-message, grpc-status-details-bin, x-request-id, retry-after-ms"
JWT_PROVIDER = "towerco"
#: Where the client's x-request-id waits, before Envoy makes its own, for request_id.lua to judge.
CLIENT_REQUEST_ID_HEADER = f"{INTERNAL_PREFIX}client-request-id"
#: Set on every error reply Envoy makes itself (the HTTP status it chose), for grpc_replies.lua.
LOCAL_REPLY_HEADER = f"{INTERNAL_PREFIX}local-reply"
#: gRPC statuses after which a call was certainly not processed, so the gateway may try it
#: again: UNAVAILABLE (the service's promise: refused before any work, e.g. while it stops),
#: no connection made, a stream refused, or a reset before the request left Envoy. Never a
#: reset after it was sent, a timeout or CANCELLED: the call may have done its work.
SAFE_RETRY_ON = "unavailable,connect-failure,refused-stream,reset-before-request"
#: The claim naming the caller's tenant (services/runtime/auth.py reads the same).
TENANT_CLAIM = "tenant_id"
#: Where jwt_authn puts a verified token's tenant claim, for penalty_box.lua (which takes it off).
TOKEN_TENANT_HEADER = f"{INTERNAL_PREFIX}token-tenant"
#: Set by tenant_issuer.lua on a call whose bearer token names a tenant's own issuer (single
#: sign-on): jwt_authn lets it through to the services, which verify it. Never the client's.
TENANT_ISSUER_HEADER = f"{INTERNAL_PREFIX}tenant-issuer"
#: Tokens whose issuer decision one Envoy worker keeps (tenant_issuer.lua), and hosts whose tenant.
TOKENS_CACHED = 2048
HOSTS_CACHED = 1024
#: The trailer giving a refusal's wait in milliseconds (services/runtime/interceptors/error_details.py).
RETRY_AFTER_HEADER = "retry-after-ms"
#: The longest a tenant stays in the penalty box however long the service said to wait: the
#: wait is exact, but a plan raised within it takes effect only after it.
PENALTY_BOX_MAX_WAIT_SECONDS = 60
#: How long past the end of a refusal's wait the box goes on letting the tenant's calls through
#: one per interval of its rate (the interval from the refusal's per_minute), answering the
#: rest itself; then it forgets the tenant until the service refuses it again. A plan raised
#: meanwhile takes effect at most this long after the wait.
PENALTY_BOX_PACE_SECONDS = 5
#: Tenant and limit pairs one Envoy worker may hold in the penalty box at once; past it,
#: refusals go on reaching the services (which still refuse them).
PENALTY_BOX_MAX_ENTRIES = 20000
#: A refusal the penalty box holds (GATEWAY_REFUSAL_HOLD_MAX_MS at most, GATEWAY_REFUSAL_HOLD_MAX_HELD
#: at once) ends this long before the call's own
#: deadline (grpc-timeout), so the client gets the refusal, not DEADLINE_EXCEEDED.
REFUSAL_HOLD_MARGIN_MS = 20
#: Where the penalty box puts a refusal it holds, for the hold route to answer with (request
#: headers under INTERNAL_PREFIX: a client's copies are removed on arrival).
HELD_REFUSAL_HEADERS = {
    "message": f"{INTERNAL_PREFIX}held-grpc-message",
    "details": f"{INTERNAL_PREFIX}held-grpc-details",
    "retry": f"{INTERNAL_PREFIX}held-retry-after-ms",
}
#: Envoy's fault filter, in the chain for the holds alone: it delays a call by the milliseconds
#: in FAULT_DELAY_HEADER, only when the held refusal's headers are there.
FAULT_FILTER = "envoy.filters.http.fault"
FAULT_DELAY_HEADER = "x-envoy-fault-delay-request"
#: Headers that steer Envoy's fault filter; a client's copies are removed on arrival.
FAULT_HEADER_PREFIX = "x-envoy-fault-"
#: The Lua filter before jwt_authn (request ids, gRPC replies, tenant issuers); the one after it
#: is domains.EDGE_FILTER (edge identity and the penalty box), whose routes' metadata it reads.
INTAKE_FILTER = "towerco.intake"
#: Every platform API path starts so; the token rule and the tenant rule apply to them.
API_PREFIX = "/towerco."
#: The listener's route configuration, inline or from the routes file (RDS).
ROUTE_CONFIG_NAME = "gateway"
#: What a load balancer asks the gateway (HTTP GET on the listener): 200 while it serves.
HEALTH_PATH = "/healthz"
#: The web page may load only itself; its API calls go to its own origin. Its styles are
#: stylesheets of its own origin only (app.css, and the tenant's /branding.css): no inline
#: style element or attribute applies, so neither can a tenant's CSS but as that sheet.
PAGE_SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; img-src 'self' https: data:; style-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}
WEB_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
}
#: The RPC that answers the page's GET of the host tenant's stylesheet (its custom CSS) at the
#: path its google.api.http rule names (/branding.css), transcoded by Envoy on that route only.
_REGISTRY: ServiceDescriptor = tenant_registry_service_pb2.DESCRIPTOR.services_by_name["TenantRegistryService"]
BRANDING_STYLESHEET: MethodDescriptor = _REGISTRY.methods_by_name["GetBrandingStylesheet"]
TRANSCODER = "envoy.filters.http.grpc_json_transcoder"


# The variables the gateway reads (its own, and those it shares with the services).

GATEWAY_BIND_HOST = text("GATEWAY_BIND_HOST", "127.0.0.1", "where the gateway listens: `0.0.0.0` in a pod")
GATEWAY_PORT = integer(
    "GATEWAY_PORT", 8080, "the gateway's listener (gRPC and gRPC-web) and its admin interface (always loopback)"
)
GATEWAY_ADMIN_PORT = integer("GATEWAY_ADMIN_PORT", 9901, GATEWAY_PORT.doc)
GATEWAY_CORS_ORIGINS = text(
    "GATEWAY_CORS_ORIGINS",
    "",
    "origins a browser may call the API from, comma-separated: exact origins, or `scheme://*.<domain>[:port]` "
    "for tenants' subdomains; `*` is refused",
    shown="`http://*.<BASE_DOMAIN>:<GATEWAY_PORT>`",
)
# Whole seconds, as they always were: "1.5" is refused.
GATEWAY_ROUTE_TIMEOUT_SECONDS = integer(
    "GATEWAY_ROUTE_TIMEOUT_SECONDS",
    15,
    "longest call through the gateway (DEADLINE_EXCEEDED after it); a client's shorter `grpc-timeout` travels "
    "on to the service",
)
GATEWAY_MAX_CONNECTIONS = integer(
    "GATEWAY_MAX_CONNECTIONS", 10000, "connections the gateway holds at once; past it new ones are refused"
)
GATEWAY_FIRST_BYTES_TIMEOUT_SECONDS = integer(
    "GATEWAY_FIRST_BYTES_TIMEOUT_SECONDS", 5, "a connection that sends nothing for this long is closed"
)
GATEWAY_IDLE_TIMEOUT_SECONDS = integer(
    "GATEWAY_IDLE_TIMEOUT_SECONDS",
    15,
    "a connection with no call in flight is closed after this (HTTP/2: GOAWAY; gRPC clients reconnect on their "
    "next call)",
)
GATEWAY_MAX_HEAP_MB = integer(
    "GATEWAY_MAX_HEAP_MB",
    400,
    "Envoy's heap budget (below the pod's memory limit): from 80% idle connections are closed sooner, down to "
    "1 s at 95%; at 98% new calls get UNAVAILABLE",
)
_TLS_DOC = (
    "the gateway serves TLS with this PEM certificate chain and key (both or neither), ALPN `h2,http/1.1` for "
    "gRPC and gRPC-web; unset: plaintext. `make run` uses `make certs`' pair when it is there"
)
GATEWAY_REFUSAL_HOLD_MAX_MS = integer(
    "GATEWAY_REFUSAL_HOLD_MAX_MS",
    200,
    "the longest the gateway's penalty box holds one of its refusals before answering it (never past the "
    "wait it gives, nor the call's deadline): a client calling again the moment it is answered is paced to "
    "its concurrency per hold; 0 answers at once",
    minimum=0,
)
GATEWAY_REFUSAL_HOLD_MAX_HELD = integer(
    "GATEWAY_REFUSAL_HOLD_MAX_HELD",
    1000,
    "most refusals the gateway holds at once (Envoy's `max_active_faults`); past them a refusal is answered at "
    "once, still by the gateway",
    minimum=0,
)
GATEWAY_TLS_CERT_FILE = text("GATEWAY_TLS_CERT_FILE", "", _TLS_DOC)
GATEWAY_TLS_KEY_FILE = text("GATEWAY_TLS_KEY_FILE", "", _TLS_DOC)
GATEWAY_UPSTREAM_TLS_CA_FILE = text(
    "GATEWAY_UPSTREAM_TLS_CA_FILE",
    "",
    "the gateway calls the services over TLS, verifying them with this CA (PEM) and the host names of their "
    "`<SERVICE>_TARGET`; for services with `GRPC_TLS_CERT_FILE`. Unset: plaintext",
)
GATEWAY_WEB_DIR = text(
    "GATEWAY_WEB_DIR",
    str(WEB_DIST),
    "the built page the gateway serves at `/` (none if not built)",
    shown="`gateway/web/dist`",
)

GATEWAY_ROUTES_DIR = text(
    "GATEWAY_ROUTES_DIR",
    "",
    "the folder of the gateway's routes file: Envoy reloads it when `python -m gateway domains` renames a new one "
    "in, with the tenants' custom domains (see Gateway). Unset: routes in the configuration, no custom domains",
    shown="`$DATA_DIR/gateway/routes` under `make run`",
)

GATEWAY_SETTINGS = SettingsTable.of(
    "gateway",
    GATEWAY_BIND_HOST,
    GATEWAY_PORT,
    GATEWAY_ADMIN_PORT,
    GATEWAY_CORS_ORIGINS,
    GATEWAY_ROUTE_TIMEOUT_SECONDS,
    GATEWAY_MAX_CONNECTIONS,
    GATEWAY_FIRST_BYTES_TIMEOUT_SECONDS,
    GATEWAY_IDLE_TIMEOUT_SECONDS,
    GATEWAY_MAX_HEAP_MB,
    GATEWAY_TLS_CERT_FILE,
    GATEWAY_TLS_KEY_FILE,
    GATEWAY_UPSTREAM_TLS_CA_FILE,
    GATEWAY_WEB_DIR,
    GATEWAY_ROUTES_DIR,
    BASE_DOMAIN,
    JWT_ISSUER,
    JWT_AUDIENCE,
    JWT_JWKS_FILE,
    JWT_JWKS_URL,
    JWT_LEEWAY_SECONDS,
    # The penalty box's held refusals (gateway/penalty_box.lua).
    GATEWAY_REFUSAL_HOLD_MAX_MS,
    GATEWAY_REFUSAL_HOLD_MAX_HELD,
    PORTS.values(),
    TARGETS.values(),
    # Read by Envoy itself (``%ENVIRONMENT(GATEWAY_SECRET)%``), never by the renderer.
    GATEWAY_SECRET,
    # The domain sync's identity towards the registry (gateway/domains.py).
    SERVICE_JWT_ISSUER,
    SERVICE_KEY_FILE,
    SERVICE_KEY_ID,
    DATA_DIR,
)


@dataclass(frozen=True)
class GatewaySettings:
    """Everything the gateway's configuration depends on."""

    #: Where the listener binds: loopback in dev, ``0.0.0.0`` in a pod.
    bind_host: str = GATEWAY_BIND_HOST.default
    port: int = GATEWAY_PORT.default
    #: The admin interface, always on loopback.
    admin_port: int = GATEWAY_ADMIN_PORT.default
    #: Tenants are ``<tenant>.<base_domain>``.
    base_domain: str = BASE_DOMAIN.default
    #: Origins a browser may call the API from: exact origins, or ``scheme://*.<domain>[:port]``
    #: for the tenants' subdomains of one domain. Never ``*``.
    cors_origins: tuple[str, ...] = ()
    jwt_issuer: str = JWT_ISSUER.default
    jwt_audience: str = JWT_AUDIENCE.default
    #: Exactly one of these: the local JWKS file (dev) or the identity provider's JWKS URL.
    jwt_jwks_file: str = ""
    jwt_jwks_url: str = ""
    jwt_clock_skew_seconds: int = JWT_LEEWAY_SECONDS.default
    #: ``host:port`` of each service, or several, comma-separated: the gateway balances
    #: over them and retries a refused call on another (a DNS name may also give several).
    targets: Mapping[str, str] = field(default_factory=dict)
    #: Upper bound of one API call through the gateway (then DEADLINE_EXCEEDED).
    route_timeout_seconds: float = GATEWAY_ROUTE_TIMEOUT_SECONDS.default
    #: Connections the listener holds at once before refusing more.
    max_connections: int = GATEWAY_MAX_CONNECTIONS.default
    #: A connection that has sent no byte within this is closed: a client that only opens
    #: sockets holds each for this long at most.
    first_bytes_timeout_seconds: float = GATEWAY_FIRST_BYTES_TIMEOUT_SECONDS.default
    #: A connection with no call in flight is closed after this (HTTP/2 with a GOAWAY, which
    #: gRPC clients follow by reconnecting on their next call).
    idle_timeout_seconds: float = GATEWAY_IDLE_TIMEOUT_SECONDS.default
    #: The heap Envoy may use; as it fills, idle connections are closed sooner (see
    #: gateway/overload.py). Below the pod's memory limit.
    max_heap_mb: int = GATEWAY_MAX_HEAP_MB.default
    #: The built web page, or None to serve none.
    web_dir: Path | None = None
    #: The listener's certificate chain and key (PEM files), or empty for plaintext.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: The CA the services' certificates chain to, or empty to call them in plaintext.
    upstream_tls_ca_file: str = ""
    #: The folder Envoy reads its routes file from (RDS), rewritten with the custom domains;
    #: empty: the routes are in the configuration itself, without custom domains.
    routes_dir: str = ""
    #: The longest the penalty box holds one of its refusals before answering it: up to the wait
    #: it gives, so that a client that calls again the moment it is answered (a closed loop, a
    #: retry storm) is paced to its concurrency per hold instead of taking thousands of refusals a
    #: second from Envoy's workers. A client that waits as told loses nothing. 0: answered at once.
    refusal_hold_max_ms: int = GATEWAY_REFUSAL_HOLD_MAX_MS.default
    #: Refusals one Envoy holds at once (the fault filter's max_active_faults, over all its
    #: workers): past them a refusal is answered at once, still by the gateway.
    refusal_hold_max_held: int = GATEWAY_REFUSAL_HOLD_MAX_HELD.default

    @property
    def serves_tls(self) -> bool:
        return bool(self.tls_cert_file)

    @property
    def scheme(self) -> str:
        """What a browser's origin and a client's URL start with."""
        return "https" if self.serves_tls else "http"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GatewaySettings:
        """The gateway's settings from ``environ`` (the process environment by default)."""
        env = process_environment() if environ is None else environ
        port = GATEWAY_PORT.read(env)
        base_domain = BASE_DOMAIN.read(env).lower().strip(".")
        jwks_url = JWT_JWKS_URL.read(env)
        jwks_file = JWT_JWKS_FILE.read(env) or ("" if jwks_url else str(data_dir(env) / "keys" / "jwks.json"))
        cert_file, key_file = GATEWAY_TLS_CERT_FILE.read(env), GATEWAY_TLS_KEY_FILE.read(env)
        if bool(cert_file) != bool(key_file):
            raise SettingsError("set both GATEWAY_TLS_CERT_FILE and GATEWAY_TLS_KEY_FILE to serve TLS, or neither")
        scheme = "https" if cert_file else "http"
        origins = GATEWAY_CORS_ORIGINS.read(env) or f"{scheme}://*.{base_domain}:{port}"
        web = GATEWAY_WEB_DIR.read(env)
        return cls(
            bind_host=GATEWAY_BIND_HOST.read(env),
            port=port,
            admin_port=GATEWAY_ADMIN_PORT.read(env),
            base_domain=base_domain,
            cors_origins=tuple(o.strip() for o in origins.split(",") if o.strip()),
            jwt_issuer=JWT_ISSUER.read(env),
            jwt_audience=JWT_AUDIENCE.read(env),
            jwt_jwks_file=jwks_file,
            jwt_jwks_url=jwks_url,
            jwt_clock_skew_seconds=JWT_LEEWAY_SECONDS.read(env),
            targets=service_targets(env),
            route_timeout_seconds=float(GATEWAY_ROUTE_TIMEOUT_SECONDS.read(env)),
            max_connections=GATEWAY_MAX_CONNECTIONS.read(env),
            first_bytes_timeout_seconds=float(GATEWAY_FIRST_BYTES_TIMEOUT_SECONDS.read(env)),
            idle_timeout_seconds=float(GATEWAY_IDLE_TIMEOUT_SECONDS.read(env)),
            max_heap_mb=GATEWAY_MAX_HEAP_MB.read(env),
            web_dir=Path(web) if (Path(web) / "index.html").is_file() else None,
            tls_cert_file=cert_file,
            tls_key_file=key_file,
            upstream_tls_ca_file=GATEWAY_UPSTREAM_TLS_CA_FILE.read(env),
            routes_dir=GATEWAY_ROUTES_DIR.read(env),
            refusal_hold_max_ms=GATEWAY_REFUSAL_HOLD_MAX_MS.read(env),
            refusal_hold_max_held=GATEWAY_REFUSAL_HOLD_MAX_HELD.read(env),
        )


# What is routed


def served_services() -> dict[str, tuple[ServiceDescriptor, ...]]:
    """The gRPC services each platform service serves, from its ``SPEC``."""
    return {name: importlib.import_module(f"services.{name}.__main__").SPEC.services for name in DEFAULT_PORTS}


@dataclass(frozen=True)
class Api:
    """The routes of one upstream service."""

    cluster: str
    #: ``/package.Service/`` of each public gRPC service it serves.
    prefixes: tuple[str, ...]
    #: Full paths of its RPCs that need no token.
    public_paths: tuple[str, ...]
    #: Full path of each RPC a tenant's rate counts, and the limit it counts against.
    rate_limits: tuple[tuple[str, str], ...] = ()

    @property
    def health_service(self) -> str:
        """The gRPC service name the gateway's health checks ask: SERVING only while the
        service's database answers and no isolation breach stands (services/runtime/health.py)."""
        return self.prefixes[0].strip("/") if self.prefixes else ""


def apis(served: Mapping[str, Iterable[ServiceDescriptor]] | None = None) -> list[Api]:
    """Routes for every service, from the policies in the protos; internal ones are left out."""
    result = []
    for cluster, services in (served or served_services()).items():
        public = [s for s in services if not s.full_name.startswith(INTERNAL_PACKAGE_PREFIX)]
        table = PolicyTable.from_services(public)
        paths = tuple(sorted(f"/{s.full_name}/{m.name}" for s in public for m in s.methods))
        result.append(
            Api(
                cluster=cluster,
                prefixes=tuple(f"/{s.full_name}/" for s in public),
                public_paths=tuple(p for p in paths if (policy := table.get(p)) is not None and policy.public),
                rate_limits=tuple(
                    (p, policy.rate_limit) for p in paths if (policy := table.get(p)) is not None and not policy.public
                ),
            )
        )
    return result


# The template


def render(
    settings: GatewaySettings, routes: list[Api] | None = None, domains: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The Envoy bootstrap for ``settings``: its routes read from ``routes_dir`` if set, else in
    it, with ``domains`` (custom domain -> tenant) if given (what ``validate`` checks)."""
    if bool(settings.jwt_jwks_file) == bool(settings.jwt_jwks_url):
        raise SettingsError("set exactly one of JWT_JWKS_FILE and JWT_JWKS_URL")
    routes = apis() if routes is None else routes
    clusters = [
        _service_cluster(api.cluster, settings.targets[api.cluster], settings.upstream_tls_ca_file, api.health_service)
        for api in routes
    ]
    if settings.jwt_jwks_url:
        clusters.append(_jwks_cluster(settings.jwt_jwks_url))
    return {
        "node": {"id": "towerco-gateway", "cluster": "towerco-gateway"},
        "admin": {"address": _address("127.0.0.1", settings.admin_port)},
        "static_resources": {
            "listeners": [_listener(settings, routes, domains)],
            "clusters": clusters,
        },
        "overload_manager": overload_manager(settings.max_connections, settings.max_heap_mb * 2**20),
    }


def render_json(settings: GatewaySettings, routes: list[Api] | None = None) -> str:
    return json.dumps(render(settings, routes), indent=2) + "\n"


def routes_template(settings: GatewaySettings, routes: list[Api] | None = None) -> RoutesTemplate:
    """What ``python -m gateway domains`` adds the custom domains to: the rendered routes, the
    Host values of a domain (bare, and with the listener's port), and the origins its CORS
    policy admits: ``https://<domain>``, and each ``scheme://*.<BASE_DOMAIN>[:port]`` of
    ``GATEWAY_CORS_ORIGINS`` with the domain in place of the subdomains."""
    subdomains = f"*.{settings.base_domain}"
    origins = ["https://{domain}"]
    for origin in settings.cors_origins:
        parts = urlsplit(origin)
        if parts.hostname == subdomains:
            form = origin.replace(subdomains, "{domain}", 1)
            origins += [] if form in origins else [form]
    return RoutesTemplate(
        _route_config(settings, apis() if routes is None else routes),
        ("{domain}", f"{{domain}}:{settings.port}"),
        tuple(origins),
    )


def _route_source(settings: GatewaySettings, routes: list[Api], domains: Mapping[str, str] | None) -> dict[str, Any]:
    """The connection manager's routes: RDS from ``routes_dir`` (reloaded when a new file is
    renamed into it), or inline."""
    if domains is not None or not settings.routes_dir:
        return {"route_config": with_domains(routes_template(settings, routes), domains or {})}
    folder = Path(settings.routes_dir)
    source = {"path": str(folder / ROUTES_FILE), "watched_directory": {"path": str(folder)}}
    return {
        "rds": {
            "route_config_name": ROUTE_CONFIG_NAME,
            "config_source": {"resource_api_version": "V3", "path_config_source": source},
        }
    }


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _typed(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _listener(settings: GatewaySettings, routes: list[Api], domains: Mapping[str, str] | None) -> dict[str, Any]:
    manager = _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="gateway",
        # HTTP/1.1 (gRPC-web) and HTTP/2 (gRPC, gRPC-web) on the one port.
        codec_type="AUTO",
        # The gateway is the edge: the client's address is the peer's, appended to
        # x-forwarded-for, and client-sent x-envoy-* headers are not trusted.
        use_remote_address=True,
        xff_num_trusted_hops=0,
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action="REJECT_REQUEST",
        common_http_protocol_options={
            # Counted from the connection's start too, so one that never sends a call goes.
            "idle_timeout": _seconds(settings.idle_timeout_seconds),
            "headers_with_underscores_action": "REJECT_REQUEST",
        },
        http2_protocol_options={
            "max_concurrent_streams": 100,
            "initial_stream_window_size": 65536,
            "initial_connection_window_size": 1048576,
            # A peer that stopped answering (gone without a FIN) frees its connection.
            "connection_keepalive": {"interval": "30s", "timeout": "10s"},
        },
        stream_idle_timeout="300s",
        local_reply_config=_local_replies(),
        # A call's headers arrive whole within this, or the call is refused.
        request_headers_timeout="5s",
        # The client's well-formed x-request-id is kept (request_id.lua, by the services' rule),
        # else Envoy's own; either way the client reads it back, on errors too.
        early_header_mutation_extensions=[_identity_headers_mutation(), _client_request_id_mutation()],
        always_set_request_id_in_response=True,
        access_log=_access_logs(),
        http_filters=[
            # The load balancer's probe, answered by Envoy itself (503 once it is draining).
            {"name": "envoy.filters.http.health_check", "typed_config": _health_path()},
            {
                "name": "envoy.filters.http.grpc_web",
                "typed_config": _typed("envoy.extensions.filters.http.grpc_web.v3.GrpcWeb"),
            },
            {"name": "envoy.filters.http.cors", "typed_config": _typed("envoy.extensions.filters.http.cors.v3.Cors")},
            # One Lua filter per run of Lua steps (each filter costs Envoy a coroutine per call and
            # direction). Before jwt_authn: the request id (so that every reply from here on, the
            # gateway's own refusals too, carries the client's), gRPC replies (so that jwt_authn's
            # refusals pass through it on their way out, before grpc_web encodes them) and the
            # tenant issuers' tokens, marked for jwt_authn to leave to the services.
            {
                "name": INTAKE_FILTER,
                "typed_config": _lua_filter(
                    _request_id_lua(), _grpc_replies_lua(settings), _tenant_issuer_lua(settings)
                ),
            },
            {"name": "envoy.filters.http.jwt_authn", "typed_config": _jwt_authn(settings, routes)},
            # After it: the tenant, then a tenant's own calls while it is over its rate.
            {
                "name": EDGE_FILTER,
                "typed_config": _lua_filter(_edge_lua(settings, routes), _penalty_box_lua(settings, routes)),
            },
            # The penalty box's held refusals (the hold route) wait here before the router answers them.
            _refusal_hold_filter(settings),
            # The page's stylesheet only (GET /branding.css -> GetBrandingStylesheet): off by
            # default and turned on by that route, so an API call never enters it.
            *([_stylesheet_transcoder()] if settings.web_dir is not None else []),
            {
                "name": "envoy.filters.http.router",
                "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router"),
            },
        ],
        **_route_source(settings, routes, domains),
    )
    return {
        "name": "gateway",
        "address": _address(settings.bind_host, settings.port),
        # The inspector waits for a connection's first bytes (its TLS ClientHello, or its
        # HTTP request); one that sends none within the timeout is closed before it reaches
        # the HTTP layer.
        "listener_filters": [_first_bytes_inspector(settings)],
        "listener_filters_timeout": _seconds(settings.first_bytes_timeout_seconds),
        "continue_on_listener_filters_timeout": False,
        # What one connection may have buffered (Envoy's default is 1 MiB).
        "per_connection_buffer_limit_bytes": 32768,
        # Each new connection goes to the Envoy worker holding the fewest, not where the kernel
        # hashes its addresses (SO_REUSEPORT): a worker serves every call of its connections,
        # so a few busy clients on one worker would queue others' calls while another idles.
        "connection_balance_config": {"exact_balance": {}},
        "filter_chains": [
            {
                "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}],
                **({"transport_socket": _downstream_tls(settings)} if settings.serves_tls else {}),
            }
        ],
    }


def _first_bytes_inspector(settings: GatewaySettings) -> dict[str, Any]:
    if settings.serves_tls:
        return {
            "name": "envoy.filters.listener.tls_inspector",
            "typed_config": _typed("envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"),
        }
    return {
        "name": "envoy.filters.listener.http_inspector",
        "typed_config": _typed("envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"),
    }


def _downstream_tls(settings: GatewaySettings) -> dict[str, Any]:
    """TLS on the listener; ALPN offers HTTP/2 first (native gRPC needs it, gRPC-web takes
    either) and HTTP/1.1 for the browsers and clients that ask for it."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": _typed(
            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            common_tls_context={
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": settings.tls_cert_file},
                        "private_key": {"filename": settings.tls_key_file},
                    }
                ],
            },
        ),
    }


def _health_path() -> dict[str, Any]:
    """``GET HEALTH_PATH``: 200 while Envoy serves, 503 once it drains (``POST /healthcheck/fail``
    on the admin interface, or shutting down), so a load balancer takes it out first. Whether
    the services are ready is theirs to say, to the clusters' health checks: a gateway with
    none ready still answers each call (UNAVAILABLE, retry later), so it stays in."""
    return _typed(
        "envoy.extensions.filters.http.health_check.v3.HealthCheck",
        pass_through_mode=False,
        headers=[{"name": ":path", "string_match": {"exact": HEALTH_PATH}}],
    )


def _identity_headers_mutation() -> dict[str, Any]:
    """Identity headers are the gateway's to set, never the client's: a client's copy of each of
    IDENTITY_HEADERS and of every header under INTERNAL_PREFIX is removed before any filter reads
    the request. Natively, where a Lua filter walking every header cost each call tens of µs."""
    return {
        "name": "towerco.identity_headers",
        "typed_config": _typed(
            "envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
            mutations=[
                *({"remove": name} for name in IDENTITY_HEADERS),
                {"remove_on_match": {"key_matcher": {"prefix": INTERNAL_PREFIX}}},
                # Only the penalty box asks for a delay (for its held refusals), never a client.
                {"remove_on_match": {"key_matcher": {"prefix": FAULT_HEADER_PREFIX}}},
            ],
        ),
    }


def _client_request_id_mutation() -> dict[str, Any]:
    """Before Envoy replaces x-request-id with its own, the client's moves aside for request_id.lua."""
    return {
        "name": "towerco.client_request_id",
        "typed_config": _typed(
            "envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
            mutations=[
                {"remove": CLIENT_REQUEST_ID_HEADER},
                {
                    "append": {
                        "header": {"key": CLIENT_REQUEST_ID_HEADER, "value": "%REQ(X-REQUEST-ID)%"},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                        "keep_empty_value": False,
                    }
                },
                {"remove": "x-request-id"},
            ],
        ),
    }


def _marked(status: str) -> list[dict[str, Any]]:
    return [{"header": {"key": LOCAL_REPLY_HEADER, "value": status}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]


def _local_replies() -> dict[str, Any]:
    """Every error Envoy makes itself is marked with its HTTP status, so grpc_replies.lua
    tells it from a service's answer even when Envoy already wrote it as a gRPC status
    (for a native gRPC call) and the HTTP status is gone.

    jwt_authn answers a token for another audience with 403 (PERMISSION_DENIED); a token
    not meant for this API is a bad token, so it is answered 401 (UNAUTHENTICATED) like any other."""
    any_error = {
        "status_code_filter": {
            "comparison": {"op": "GE", "value": {"default_value": 400, "runtime_key": "gateway.local_reply_min"}}
        }
    }
    return {
        "mappers": [
            {
                "filter": {
                    "and_filter": {
                        "filters": [
                            {
                                "status_code_filter": {
                                    "comparison": {
                                        "op": "EQ",
                                        "value": {"default_value": 403, "runtime_key": "gateway.jwt_403"},
                                    }
                                }
                            },
                            {
                                "metadata_filter": {
                                    "matcher": {
                                        "filter": "envoy.filters.http.jwt_authn",
                                        "path": [{"key": "jwt_failure"}],
                                        "value": {"present_match": True},
                                    },
                                    "match_if_key_not_found": False,
                                }
                            },
                        ]
                    }
                },
                "status_code": 401,
                "headers_to_add": _marked("401"),
            },
            {"filter": any_error, "headers_to_add": _marked("%RESPONSE_CODE%")},
        ]
    }


def _route_config(settings: GatewaySettings, routes: list[Api]) -> dict[str, Any]:
    api_routes = [
        {
            "match": {"prefix": prefix},
            "route": {
                "cluster": api.cluster,
                # The bound of every call; a client's shorter grpc-timeout travels on to the
                # service, which ends the call then. (grpc_timeout_header_max would replace
                # this bound by the header, and leave calls without one unbounded.)
                "timeout": _seconds(settings.route_timeout_seconds),
                "retry_policy": _retry_policy(),
            },
        }
        for api in routes
        for prefix in api.prefixes
    ]
    page_routes = _page_routes(settings, routes)
    return {
        "name": ROUTE_CONFIG_NAME,
        "max_direct_response_body_size_bytes": _largest_page_file(settings) * 2,
        "virtual_hosts": [
            {
                "name": "api",
                "domains": ["*"],
                "routes": [_held_refusal_route(), *api_routes, *page_routes, _unknown_api_route()],
                "typed_per_filter_config": {"envoy.filters.http.cors": _cors_policy(settings)},
                "request_headers_to_add": [_gateway_proof()],
            }
        ],
    }


def _page_routes(settings: GatewaySettings, routes: list[Api]) -> list[dict[str, Any]]:
    """The web page's files and the host tenant's stylesheet; none when no page is built."""
    if settings.web_dir is None:
        return []
    page_routes = [
        {
            "match": {"path": path, "headers": [_GET]},
            "direct_response": {"status": 200, "body": {"filename": str(settings.web_dir / name)}},
            "response_headers_to_add": _overwrite({"content-type": content_type, **PAGE_SECURITY_HEADERS}),
        }
        for path, (name, content_type) in WEB_FILES.items()
    ]
    stylesheet = _stylesheet_route(settings, routes)
    return [*page_routes, stylesheet] if stylesheet is not None else page_routes


def _largest_page_file(settings: GatewaySettings) -> int:
    files = [settings.web_dir / name for name, _ in WEB_FILES.values()] if settings.web_dir else []
    return max([4096, *(file.stat().st_size for file in files if file.exists())])


_GET = {"name": ":method", "string_match": {"exact": "GET"}}


def _overwrite(headers: Mapping[str, str]) -> list[dict[str, Any]]:
    return [
        {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        for key, value in headers.items()
    ]


def stylesheet_path() -> str:
    """Where the page loads its tenant's stylesheet: the path of GetBrandingStylesheet's http rule."""
    rule: Any = BRANDING_STYLESHEET.GetOptions().Extensions[annotations_pb2.http]
    return str(rule.get)


def _stylesheet_route(settings: GatewaySettings, routes: list[Api]) -> dict[str, Any] | None:
    """GET /branding.css on a tenant's host: GetBrandingStylesheet of that tenant (edge.lua set
    x-tenant-id from the host), its google.api.HttpBody answered as the text/css it holds. The
    gRPC-JSON transcoder is enabled here only; the route keeps the registry's cluster."""
    prefix = f"/{BRANDING_STYLESHEET.containing_service.full_name}/"
    cluster = next((api.cluster for api in routes if prefix in api.prefixes), None)
    if cluster is None:
        return None
    return {
        "match": {"path": stylesheet_path(), "headers": [_GET]},
        "route": {
            "cluster": cluster,
            "timeout": _seconds(settings.route_timeout_seconds),
            "retry_policy": _retry_policy(),
        },
        "typed_per_filter_config": {TRANSCODER: _stylesheet_transcoding()},
        "response_headers_to_add": _overwrite(
            {"x-content-type-options": "nosniff", "cache-control": "no-cache", "referrer-policy": "no-referrer"}
        ),
    }


def _stylesheet_transcoder() -> dict[str, Any]:
    """Envoy's gRPC-JSON transcoder in the filter chain: disabled, with nothing to transcode,
    unless a route turns it on with its own configuration (:func:`_stylesheet_transcoding`)."""
    return {
        "name": TRANSCODER,
        "disabled": True,
        "typed_config": _typed(
            "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
            proto_descriptor_bin="",
            services=[],
        ),
    }


def _stylesheet_transcoding() -> dict[str, Any]:
    """The stylesheet route's transcoder: GetBrandingStylesheet's service, from its descriptors."""
    service = BRANDING_STYLESHEET.containing_service
    return _typed(
        "envoy.config.route.v3.FilterConfig",
        config=_typed(
            "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
            # With google.rpc's, so a refusal's details become its JSON body (convert_grpc_status).
            proto_descriptor_bin=base64.b64encode(
                _descriptor_set(service.file, status_pb2.DESCRIPTOR, error_details_pb2.DESCRIPTOR)
            ).decode(),
            services=[service.full_name],
            # The stylesheet's route (and its cluster) stays the call's route.
            match_incoming_request_route=True,
            # A refusal (no tenant on this host, no such tenant) is an HTTP status, not a 200.
            convert_grpc_status=True,
            request_validation_options={"reject_unknown_method": True, "reject_unknown_query_parameters": True},
        ),
    )


def _descriptor_set(*files: FileDescriptor) -> bytes:
    """``files`` and every file they import, as a serialized FileDescriptorSet (without comments)."""
    ordered: list[FileDescriptor] = []

    def visit(current: FileDescriptor) -> None:
        if current in ordered:
            return
        for dependency in current.dependencies:
            visit(dependency)
        ordered.append(current)

    for file in files:
        visit(file)
    result = descriptor_pb2.FileDescriptorSet()
    for current in ordered:
        current.CopyToProto(result.file.add())
    return result.SerializeToString(deterministic=True)


def _gateway_proof() -> dict[str, Any]:
    """The header that shows a service a call came through the gateway, so it believes the
    address Envoy appended to x-forwarded-for. Its value is the gateway secret, read from
    Envoy's environment (``GATEWAY_SECRET``), never written into this configuration."""
    return {
        "header": {"key": GATEWAY_HEADER, "value": "%ENVIRONMENT(GATEWAY_SECRET)%"},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    }


def _retry_policy() -> dict[str, Any]:
    """Calls that were certainly not processed are tried again, on another host where there is one."""
    return {
        "retry_on": SAFE_RETRY_ON,
        "num_retries": 2,
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": _typed("envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"),
            }
        ],
        # With one host left (or one in all) the retry goes to it rather than nowhere.
        "host_selection_retry_max_attempts": 3,
        "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"},
    }


def _held_refusal_route() -> dict[str, Any]:
    """A refusal the penalty box holds: matched first (in every virtual host, custom domains' too)
    on the header the box set, which no client can send; by then the fault filter has held the
    call for its delay. Answered by Envoy as the box's own refusal is (HTTP 200, Trailers-Only),
    with the status, message, details and wait the box put in the request's headers."""
    held = HELD_REFUSAL_HEADERS
    return {
        "match": {"prefix": "/", "headers": [{"name": held["details"], "present_match": True}]},
        "direct_response": {"status": 200},
        "response_headers_to_add": _overwrite(
            {
                "content-type": "application/grpc",
                "grpc-status": str(error_catalogue.entry(error_catalogue.name(ErrorReason.RATE_LIMITED)).code.value[0]),
                "grpc-message": f"%REQ({held['message']})%",
                "grpc-status-details-bin": f"%REQ({held['details']})%",
                RETRY_AFTER_HEADER: f"%REQ({held['retry']})%",
            }
        ),
    }


def _refusal_hold_filter(settings: GatewaySettings) -> dict[str, Any]:
    """Envoy's fault filter, delaying only a call that carries a held refusal's headers (set by
    the penalty box) by the milliseconds in FAULT_DELAY_HEADER; at most ``refusal_hold_max_held``
    at once, past which the call goes on at once (to the hold route's answer)."""
    return {
        "name": FAULT_FILTER,
        "typed_config": _typed(
            "envoy.extensions.filters.http.fault.v3.HTTPFault",
            delay={"header_delay": {}, "percentage": {"numerator": 100, "denominator": "HUNDRED"}},
            headers=[{"name": HELD_REFUSAL_HEADERS["details"], "present_match": True}],
            max_active_faults=settings.refusal_hold_max_held,
        ),
    }


def _unknown_api_route() -> dict[str, Any]:
    """Any other API path (an internal service, a typo) is UNIMPLEMENTED, as a gRPC server says."""
    return {
        "match": {"prefix": API_PREFIX},
        "direct_response": {"status": 200},
        "response_headers_to_add": [
            {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for key, value in {
                "content-type": "application/grpc",
                "grpc-status": "12",
                "grpc-message": "no such API method here: the gateway serves the platform's public services",
            }.items()
        ],
    }


def origin_matchers(origins: Iterable[str]) -> list[dict[str, Any]]:
    """Envoy string matchers for the allowed origins; a bare wildcard is refused."""
    matchers: list[dict[str, Any]] = []
    for origin in origins:
        parts = urlsplit(origin)
        host = parts.hostname or ""
        if parts.scheme not in {"http", "https"} or not host or parts.path or parts.query:
            raise SettingsError(f"GATEWAY_CORS_ORIGINS: {origin!r} is not an origin like https://app.example.com")
        port = f":{parts.port}" if parts.port else ""
        if host.startswith("*."):
            domain = host[2:]
            if not domain or "*" in domain:
                raise SettingsError(f"GATEWAY_CORS_ORIGINS: {origin!r}: only '*.<domain>' may use a wildcard")
            # The tenant id rule without its length bound, which RE2 would expand past its limit.
            label = f"[{TENANT_ID.first}][{TENANT_ID.rest}]+"
            regex = f"^{re.escape(parts.scheme)}://{label}\\.{re.escape(domain)}{re.escape(port)}$"
            matchers.append({"safe_regex": {"regex": regex}})
        elif "*" in origin:
            raise SettingsError(f"GATEWAY_CORS_ORIGINS: {origin!r}: only '*.<domain>' may use a wildcard")
        else:
            matchers.append({"exact": f"{parts.scheme}://{host}{port}"})
    return matchers


def _cors_policy(settings: GatewaySettings) -> dict[str, Any]:
    return _typed(
        "envoy.extensions.filters.http.cors.v3.CorsPolicy",
        allow_origin_string_match=origin_matchers(settings.cors_origins),
        allow_methods="POST, OPTIONS",
        allow_headers=CORS_ALLOW_HEADERS,
        expose_headers=CORS_EXPOSE_HEADERS,
        max_age="600",
        # A preflight from an origin not allowed is answered here, without CORS headers.
        forward_not_matching_preflights=False,
    )


def _jwt_authn(settings: GatewaySettings, routes: list[Api]) -> dict[str, Any]:
    provider: dict[str, Any] = {
        "issuer": settings.jwt_issuer,
        "audiences": [settings.jwt_audience],
        "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
        # Services verify the token again: it is forwarded as it came.
        "forward": True,
        "clock_skew_seconds": settings.jwt_clock_skew_seconds,
        # A token seen before is not verified again until it expires.
        "jwt_cache_config": {"jwt_cache_size": 10000},
        # Marks the requests jwt_authn refused, for the local reply mapper.
        "failed_status_in_metadata": "jwt_failure",
        # The verified token's tenant, for the penalty box to know whose call it is (a header
        # is cheaper for Lua to read than the claims as metadata; the box takes it off).
        "claim_to_headers": [{"header_name": TOKEN_TENANT_HEADER, "claim_name": TENANT_CLAIM}],
    }
    if settings.jwt_jwks_url:
        provider["remote_jwks"] = {
            "http_uri": {"uri": settings.jwt_jwks_url, "cluster": "jwks", "timeout": "5s"},
            "cache_duration": "600s",
            # Fetched when the listener starts and refreshed in the background, so no
            # request waits on the identity provider.
            "async_fetch": {"fast_listener": False},
            "retry_policy": {"num_retries": 3},
        }
    else:
        provider["local_jwks"] = {"filename": settings.jwt_jwks_file}
    public = [{"match": {"path": path}} for api in routes for path in api.public_paths]
    return _typed(
        "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        providers={JWT_PROVIDER: provider},
        rules=[
            *public,
            # A tenant issuer's token (tenant_issuer.lua): verified by the services, which know
            # every tenant's provider; the gateway's providers are static.
            {"match": {"prefix": API_PREFIX, "headers": [{"name": TENANT_ISSUER_HEADER, "present_match": True}]}},
            {"match": {"prefix": API_PREFIX}, "requires": {"provider_name": JWT_PROVIDER}},
        ],
        bypass_cors_preflight=True,
    )


def _edge_lua(settings: GatewaySettings, routes: list[Api]) -> LuaStep:
    message = f"call the API on your tenant's host: <tenant>.{settings.base_domain}"
    details = _status_details(ErrorReason.TENANT_SUBDOMAIN_REQUIRED, message, base_domain=settings.base_domain)
    public = ", ".join(f"[{_lua_string(path)}] = true" for api in routes for path in api.public_paths)
    return LuaStep(
        "EDGE",
        EDGE_LUA,
        base_domain=_lua_string(settings.base_domain),
        api_prefix=_lua_string(API_PREFIX),
        # Set by the intake filter for jwt_authn; never passed on.
        gateway_marks=f"{{{_lua_string(TENANT_ISSUER_HEADER)}}}",
        hosts_cached=str(HOSTS_CACHED),
        public_paths=f"{{{public}}}",
        tenant_id=_lua_rule(TENANT_ID),
        tenant_key=_lua_string(TENANT_KEY),
        no_tenant_message=_lua_string(grpc_message(message)),
        no_tenant_details=_lua_string(details),
    )


def _penalty_box_lua(settings: GatewaySettings, routes: list[Api]) -> LuaStep:
    limits = ", ".join(
        f"[{_lua_string(path)}] = {_lua_string(limit)}" for api in routes for path, limit in api.rate_limits
    )
    reason = ErrorReason.RATE_LIMITED
    name = error_catalogue.name(reason)
    return LuaStep(
        "BOX",
        PENALTY_BOX_LUA,
        limits=f"{{{limits}}}",
        reason=_lua_string(name),
        code=str(error_catalogue.entry(name).code.value[0]),
        limit_key=_lua_string("limit"),
        per_minute_key=_lua_string("per_minute"),
        slot_header=_lua_string(RATE_SLOT_HEADER),
        retry_header=_lua_string(RETRY_AFTER_HEADER),
        error_info_type=_lua_string(f"type.googleapis.com/{error_details_pb2.ErrorInfo.DESCRIPTOR.full_name}"),
        retry_info_type=_lua_string(f"type.googleapis.com/{error_details_pb2.RetryInfo.DESCRIPTOR.full_name}"),
        token_tenant_header=_lua_string(TOKEN_TENANT_HEADER),
        namespace=_lua_string("towerco.penalty_box"),
        max_wait_ms=str(PENALTY_BOX_MAX_WAIT_SECONDS * 1000),
        pace_ms=str(PENALTY_BOX_PACE_SECONDS * 1000),
        max_entries=str(PENALTY_BOX_MAX_ENTRIES),
        hold_most_ms=str(settings.refusal_hold_max_ms),
        hold_margin_ms=str(REFUSAL_HOLD_MARGIN_MS),
        hold_headers="{"
        + ", ".join(f"{key} = {_lua_string(name)}" for key, name in HELD_REFUSAL_HEADERS.items())
        + "}",
        delay_header=_lua_string(FAULT_DELAY_HEADER),
    )


def _tenant_issuer_lua(settings: GatewaySettings) -> LuaStep:
    return LuaStep(
        "ISSUERS",
        TENANT_ISSUER_LUA,
        platform_issuer=_lua_string(settings.jwt_issuer),
        header=_lua_string(TENANT_ISSUER_HEADER),
        max_token_bytes=str(MAX_TOKEN_BYTES + len("Bearer ")),
        cache_size=str(TOKENS_CACHED),
    )


def _request_id_lua() -> LuaStep:
    return LuaStep(
        "REQUEST_IDS",
        REQUEST_ID_LUA,
        client_header=_lua_string(CLIENT_REQUEST_ID_HEADER),
        pattern=_lua_string(lua_pattern(REQUEST_ID)),
        max_length=str(REQUEST_ID.max_length),
    )


class LuaStep:
    """One script of a Lua filter: the file at ``source``, after a global ``table`` of the
    rendered ``fields`` (Lua literals), so that it reads the settings and rules it was rendered
    with. The file returns its ``on_request(handle, headers)`` (true when it answered the call)
    and ``on_response(handle)``, either optional."""

    def __init__(self, table: str, source: Path, **fields: str) -> None:
        self.table, self.source, self.fields = table, source, fields

    def lua(self, index: int) -> str:
        lines = [f"{self.table} = {{", *(f"  {key} = {value}," for key, value in self.fields.items()), "}"]
        return "\n".join([*lines, f"STEPS[{index}] = (function()", self.source.read_text().rstrip(), "end)()", ""])


#: What runs a Lua filter's steps: on the request in order, until one answers; on the response
#: in reverse, as separate filters would.
_LUA_STEPS_RUNNER = """
function envoy_on_request(handle)
  local headers = handle:headers()
  for i = 1, #STEPS do
    local on_request = STEPS[i].on_request
    if on_request ~= nil and on_request(handle, headers) then
      return
    end
  end
end

local responses = {}
for i = #STEPS, 1, -1 do
  responses[#responses + 1] = STEPS[i].on_response
end
if #responses > 0 then
  function envoy_on_response(handle)
    for i = 1, #responses do
      responses[i](handle)
    end
  end
end
"""


def _lua_filter(*steps: LuaStep) -> dict[str, Any]:
    """One Lua filter running ``steps``: Envoy pays per Lua filter and call (a coroutine, a trip
    into Lua, per direction), so the steps that sit next to each other in the chain share one."""
    source = "\n".join(["local STEPS = {}", *(step.lua(i) for i, step in enumerate(steps, 1)), _LUA_STEPS_RUNNER])
    return _typed("envoy.extensions.filters.http.lua.v3.Lua", default_source_code={"inline_string": source})


def lua_pattern(rule: IdRule) -> str:
    """The characters of an identifier rule (``services/runtime/ids.py``) as a Lua pattern;
    Lua has no counted repeats, so the gateway checks the lengths on their own."""
    if rule.first == rule.rest:
        return f"^[{_lua_class(rule.rest)}]+$"
    return f"^[{_lua_class(rule.first)}][{_lua_class(rule.rest)}]*$"


def _lua_class(body: str) -> str:
    """A regex character class body as a Lua set: every printable ASCII character it holds,
    punctuation escaped with ``%``."""
    allowed = [c for c in map(chr, range(33, 127)) if re.fullmatch(f"[{body}]", c)]
    return "".join(c if c.isalnum() else f"%{c}" for c in allowed)


def _lua_rule(rule: IdRule) -> str:
    pattern = _lua_string(lua_pattern(rule))
    return f"{{pattern = {pattern}, min_length = {rule.min_length}, max_length = {rule.max_length}}}"


def grpc_message(text: str) -> str:
    """``text`` as the ``grpc-message`` header carries it: percent-encoded outside printable ASCII."""
    return "".join(c if " " <= c <= "~" and c != "%" else quote(c, safe="") for c in text)


def gateway_reasons(settings: GatewaySettings) -> dict[Reason, tuple[str, float | None]]:
    """For each error Envoy makes itself: its message, and seconds after which a retry may
    succeed (RetryInfo), or None; the gRPC code is the catalogue's (ErrorReason). Envoy's own
    wording stays in the access log."""
    token = f"JWT of issuer {settings.jwt_issuer!r} for audience {settings.jwt_audience!r}"
    return {
        ErrorReason.TOKEN_MISSING: (f"a bearer token is required (authorization: Bearer <{token}>)", None),
        ErrorReason.TOKEN_EXPIRED: ("the token has expired: sign in again for a new one", None),
        ErrorReason.TOKEN_NOT_YET_VALID: ("the token is not valid yet: check the clock of its issuer", None),
        ErrorReason.TOKEN_INVALID: (f"the token was refused: it must be a {token}, signed by one of its keys", None),
        ErrorReason.GATEWAY_TIMEOUT: (
            f"the call took longer than the gateway allows ({settings.route_timeout_seconds:g}s)",
            None,
        ),
        ErrorReason.REQUEST_TOO_LARGE: ("the request is larger than the gateway accepts", None),
        ErrorReason.REQUEST_DENIED: ("the gateway does not allow this call", None),
        ErrorReason.REQUEST_REFUSED: ("the gateway could not accept the request as sent", None),
        ErrorReason.SERVICE_UNAVAILABLE: ("the service cannot be reached just now: retry shortly", 1.0),
    }


def _status_details(reason: Reason, message: str, retry_seconds: float | None = None, **metadata: str) -> str:
    """``grpc-status-details-bin``: a google.rpc.Status with ErrorInfo (and RetryInfo), base64,
    with the code the catalogue gives ``reason`` (which refuses other metadata or RetryInfo)."""
    name = error_catalogue.name(reason)
    code = error_catalogue.entry(name).code
    error_catalogue.check(name, code, metadata, retry_seconds is not None)
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=name, domain=ERROR_DOMAIN, metadata=metadata))
    if retry_seconds is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(retry_seconds * 1e9))
        status.details.add().Pack(retry)
    return base64.b64encode(status.SerializeToString()).decode().rstrip("=")


def _access_logs() -> list[dict[str, Any]]:
    """One stdout line per call: what was asked, by which tenant, under which request id, and
    its gRPC status code where Envoy sees it. A native call's is in its trailers (or its
    trailers-only reply), which Envoy reads. A gRPC-web reply carries its trailers in the
    body, where Envoy does not look (GRPC_STATUS would say UNKNOWN for an OK): only a
    trailers-only reply's code (an error) is logged for it, "-" otherwise."""
    line = (
        '[%START_TIME%] "%REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL%" %RESPONSE_CODE% '
        "%RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %DURATION%ms "
        "authority=%REQ(:AUTHORITY)% tenant=%REQ(X-TENANT-ID)% request_id=%REQ(X-REQUEST-ID)% grpc_status={}\n"
    )

    def stdout(grpc_status: str, grpc_web: bool) -> dict[str, Any]:
        header = {"name": "x-grpc-web", "present_match": True, "invert_match": not grpc_web}
        return {
            "name": "envoy.access_loggers.stdout",
            # The load balancer's probes of HEALTH_PATH are not calls.
            "filter": {
                "and_filter": {"filters": [{"header_filter": {"header": header}}, {"not_health_check_filter": {}}]}
            },
            "typed_config": _typed(
                "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                log_format={"text_format_source": {"inline_string": line.format(grpc_status)}},
            ),
        }

    return [stdout("%GRPC_STATUS_NUMBER%", grpc_web=False), stdout("%RESP(GRPC-STATUS)%", grpc_web=True)]


def _grpc_replies_lua(settings: GatewaySettings) -> LuaStep:
    reasons = ",\n".join(
        _lua_reply(reason, message, retry) for reason, (message, retry) in gateway_reasons(settings).items()
    )
    return LuaStep(
        "REPLIES",
        GRPC_REPLIES_LUA,
        api_prefix=_lua_string(API_PREFIX),
        local_reply_header=_lua_string(LOCAL_REPLY_HEADER),
        reasons=f"{{\n{reasons}\n  }}",
    )


def _lua_reply(reason: Reason, message: str, retry_seconds: float | None) -> str:
    """One entry of ``REPLIES.reasons``, keyed by the reason's name in the catalogue."""
    name = error_catalogue.name(reason)
    code = str(error_catalogue.entry(name).code.value[0])
    details = _status_details(reason, message, retry_seconds)
    return (
        f"    {name} = {{ code = {_lua_string(code)}, message = {_lua_string(grpc_message(message))}, "
        f"details = {_lua_string(details)} }}"
    )


def _lua_string(value: str) -> str:
    return json.dumps(value)


def _upstream_address(target: str) -> tuple[str, int, bool]:
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        literal = True
    except ValueError:
        literal = False
    return host, int(port), literal


def _service_cluster(name: str, target: str, tls_ca_file: str = "", health_service: str = "") -> dict[str, Any]:
    addresses = [_upstream_address(one.strip()) for one in target.split(",") if one.strip()]
    tls = {"transport_socket": _upstream_tls(addresses, tls_ca_file)} if tls_ca_file else {}
    return {
        "name": name,
        "type": "STATIC" if all(literal for _, _, literal in addresses) else "STRICT_DNS",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {}},
            )
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _address(host, port)}} for host, port, _ in addresses]}
            ],
        },
        # The service's readiness, not its liveness (""): a NOT_SERVING answer takes the host out
        # at once (two checks without an answer do too), one SERVING answer brings it back.
        "health_checks": [
            {
                "timeout": "1s",
                "interval": "1s",
                "no_traffic_interval": "5s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "grpc_health_check": {"service_name": health_service},
            }
        ],
        # Retries (see _retry_policy) stay a fifth of the calls in flight, so they cannot
        # multiply the load on a service that is already failing.
        "circuit_breakers": {
            "thresholds": [{"retry_budget": {"budget_percent": {"value": 20.0}, "min_retry_concurrency": 3}}]
        },
        "outlier_detection": {
            "consecutive_5xx": 5,
            "consecutive_gateway_failure": 3,
            "interval": "5s",
            "base_ejection_time": "10s",
            "max_ejection_percent": 50,
        },
        **tls,
    }


def _upstream_tls(addresses: list[tuple[str, int, bool]], ca_file: str) -> dict[str, Any]:
    """TLS to a service's hosts (their health checks too): the certificate must chain to
    ``ca_file`` and name one of the hosts the target lists, by DNS name or IP address."""
    hosts = sorted({(host, literal) for host, _, literal in addresses})
    names = [{"san_type": "IP_ADDRESS" if literal else "DNS", "matcher": {"exact": host}} for host, literal in hosts]
    sni = next((host for host, literal in hosts if not literal), None)
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": _typed(
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            **({"sni": sni} if sni else {}),
            common_tls_context={
                "alpn_protocols": ["h2"],
                "validation_context": {
                    "trusted_ca": {"filename": ca_file},
                    "match_typed_subject_alt_names": names,
                },
            },
        ),
    }


def _jwks_cluster(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise SettingsError(f"JWT_JWKS_URL must be an https:// URL, got {url!r}")
    port = parts.port or 443
    return {
        "name": "jwks",
        "type": "STRICT_DNS",
        "connect_timeout": "2s",
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {
            "cluster_name": "jwks",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(parts.hostname, port)}}]}],
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": _typed(
                "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                sni=parts.hostname,
                common_tls_context={
                    "validation_context": {
                        "trusted_ca": {"filename": "/etc/ssl/certs/ca-certificates.crt"},
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": parts.hostname}}],
                    }
                },
            ),
        },
    }
