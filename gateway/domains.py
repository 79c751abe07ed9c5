"""The gateway's routes with the tenants' custom domains, kept in step with the registry.

Envoy reads its routes from a file (RDS, ``path_config_source``) in ``GATEWAY_ROUTES_DIR``
and reloads them when a new file is renamed into that folder, with no restart and no call
left waiting. The file is the rendered route configuration (the *template*, written by
``python -m gateway render``) plus one virtual host per custom domain: the API's own routes,
each naming its tenant in its metadata (edge.lua reads it as it reads a subdomain), and a
CORS policy that admits that domain's origins. ``python -m gateway domains`` polls the
registry's ``ListCustomDomains`` as a platform service every :data:`POLL_SECONDS` and
rewrites the file only when the map changed; each gateway replica runs its own, so they
converge on their own. While the registry cannot be reached the file stays as it is.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import json
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from towerco.internal.v1 import tenant_data_pb2 as internal_pb
from towerco.internal.v1 import tenant_data_pb2_grpc as internal_grpc

from services.runtime import channels
from services.runtime.environment import process_environment
from services.runtime.identity import ServiceIdentity
from services.runtime.settings import (
    BASE_DOMAIN,
    JWT_AUDIENCE,
    SERVICE_JWT_ISSUER,
    SERVICE_KEY_FILE,
    SERVICE_KEY_ID,
    data_dir,
    service_targets,
)
from services.runtime.tls import GrpcTls
from services.tenant.hosts import domain_problem

#: The Lua filter that sets a call's tenant from its host (gateway/edge.lua); a custom
#: domain's routes name their tenant under this name in their metadata.
EDGE_FILTER = "towerco.edge_identity"
TENANT_KEY = "tenant"
CORS_FILTER = "envoy.filters.http.cors"
ROUTES_FILE = "routes.json"
ROUTE_CONFIGURATION = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
#: How often each gateway asks the registry: a domain added or removed is served, or
#: refused, within this and Envoy's reload (well within 5 s).
POLL_SECONDS = 1.0
#: The service name of the sync's tokens (``service:gateway``).
SERVICE_NAME = "gateway"

log = logging.getLogger("towerco.gateway.domains")


@dataclass(frozen=True)
class RoutesTemplate:
    """The rendered routes without custom domains, and how a custom domain's host is written."""

    #: Envoy's RouteConfiguration; its first virtual host is the API's (domains ``*``).
    route_config: Mapping[str, Any]
    #: The Host values a domain's virtual host matches, ``{domain}`` standing for it.
    host_forms: tuple[str, ...]
    #: The browser origins its CORS policy admits, ``{domain}`` standing for it.
    origin_forms: tuple[str, ...]

    def to_json(self) -> str:
        document = {
            "route_config": self.route_config,
            "host_forms": list(self.host_forms),
            "origin_forms": list(self.origin_forms),
        }
        return json.dumps(document, indent=2) + "\n"

    @classmethod
    def read(cls, path: Path) -> RoutesTemplate:
        document = json.loads(path.read_text())
        return cls(document["route_config"], tuple(document["host_forms"]), tuple(document["origin_forms"]))


def route_config(template: RoutesTemplate, domains: Mapping[str, str]) -> dict[str, Any]:
    """The template's routes plus a virtual host for each domain -> tenant, in domain order."""
    api, *others = template.route_config["virtual_hosts"]
    hosts = [_domain_host(api, domain, tenant, template) for domain, tenant in sorted(domains.items())]
    return {**template.route_config, "virtual_hosts": [api, *others, *hosts]}


def _domain_host(api: Mapping[str, Any], domain: str, tenant: str, template: RoutesTemplate) -> dict[str, Any]:
    """The API's virtual host for one custom domain: its exact host names, its tenant named in
    each route's metadata (never a header a client could send), and its own CORS origins."""
    host: dict[str, Any] = copy.deepcopy(dict(api))
    host["name"] = f"domain:{domain}"
    host["domains"] = [form.format(domain=domain) for form in template.host_forms]
    for route in host["routes"]:
        route.setdefault("metadata", {}).setdefault("filter_metadata", {})[EDGE_FILTER] = {TENANT_KEY: tenant}
    cors = host.get("typed_per_filter_config", {}).get(CORS_FILTER)
    if cors is not None:
        cors["allow_origin_string_match"] = [{"exact": form.format(domain=domain)} for form in template.origin_forms]
    return host


def routes_document(template: RoutesTemplate, domains: Mapping[str, str]) -> str:
    """The RDS file: a DiscoveryResponse holding the route configuration, versioned by its content."""
    config = route_config(template, domains)
    body = json.dumps(config, sort_keys=True, separators=(",", ":"))
    version = hashlib.sha256(body.encode()).hexdigest()[:16]
    return json.dumps({"version_info": version, "resources": [{"@type": ROUTE_CONFIGURATION, **config}]}) + "\n"


def write_routes(folder: Path, template: RoutesTemplate, domains: Mapping[str, str]) -> bool:
    """Replace ``folder/routes.json`` by rename (Envoy watches the folder for moves into it),
    only if its content changes; whether it did."""
    text = routes_document(template, domains)
    path = folder / ROUTES_FILE
    if path.is_file() and path.read_text() == text:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{ROUTES_FILE}.{os.getpid()}.partial"
    partial.write_text(text)
    os.replace(partial, path)
    return True


async def custom_domains(stub: internal_grpc.TenantDirectoryServiceAsyncStub, base_domain: str) -> dict[str, str]:
    """Every custom domain -> its tenant, from the registry, page by page. A name the gateway
    could not serve safely (the registry never stores one) is left out, and logged."""
    found: dict[str, str] = {}
    token = ""
    while True:
        request = internal_pb.ListCustomDomainsRequest(page_size=500, page_token=token)
        reply = await stub.ListCustomDomains(request, timeout=5)
        for item in reply.domains:
            problem = domain_problem(item.domain, base_domain)
            if problem:
                log.warning("custom domain %r of tenant %s left out: %s", item.domain, item.tenant_id, problem)
            else:
                found[item.domain] = item.tenant_id
        token = reply.next_page_token
        if not token:
            return found


@dataclass(frozen=True)
class SyncSettings:
    """What the sync reads from its environment (the gateway's and the services' settings)."""

    registry: str
    base_domain: str
    identity: ServiceIdentity
    tls: GrpcTls

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SyncSettings:
        env = process_environment() if environ is None else environ
        identity = ServiceIdentity.from_file(
            SERVICE_NAME,
            issuer=SERVICE_JWT_ISSUER.read(env),
            audience=JWT_AUDIENCE.read(env),
            key_file=SERVICE_KEY_FILE.read(env) or str(data_dir(env) / "keys" / "service-signing-key.pem"),
            kid=SERVICE_KEY_ID.read(env),
        )
        # The gateway's setting for calling the services over TLS (config.py imports this module).
        from .config import GATEWAY_UPSTREAM_TLS_CA_FILE

        tls = GrpcTls(ca_file=GATEWAY_UPSTREAM_TLS_CA_FILE.read(env))
        return cls(service_targets(env)["tenant"], BASE_DOMAIN.read(env).lower().strip("."), identity, tls)


async def sync(
    template: RoutesTemplate, folder: Path, settings: SyncSettings, interval: float, stop: asyncio.Event
) -> None:
    """Until ``stop``: ask the registry, rewrite the routes file when the map changed."""
    channels.configure(settings.tls)
    channel = channels.service_channel(settings.registry, identity=settings.identity)
    stub = internal_grpc.TenantDirectoryServiceStub(channel)
    current: dict[str, str] | None = None
    try:
        while not stop.is_set():
            try:
                domains = await custom_domains(stub, settings.base_domain)
            except grpc.aio.AioRpcError as exc:
                # The routes stay as they are: a registry briefly out of reach removes no domain.
                log.warning("custom domains not refreshed: %s %s", exc.code().name, exc.details())
            else:
                if domains != current and write_routes(folder, template, domains):
                    log.info("gateway routes: %d custom domain(s): %s", len(domains), ", ".join(sorted(domains)))
                current = domains
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass
    finally:
        await channel.close(None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway domains", description=__doc__)
    parser.add_argument("--template", type=Path, required=True, help="the routes template `render` wrote")
    parser.add_argument("--routes-dir", type=Path, required=True, help="GATEWAY_ROUTES_DIR: where routes.json goes")
    parser.add_argument("--interval", type=float, default=POLL_SECONDS, help="seconds between two polls")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    template = RoutesTemplate.read(args.template)
    if not (args.routes_dir / ROUTES_FILE).is_file():  # Envoy can start on the routes before the first poll
        write_routes(args.routes_dir, template, {})

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await sync(template, args.routes_dir, SyncSettings.from_env(), args.interval, stop)

    asyncio.run(run())
    return 0
