"""A tenant's custom domain through the real Envoy, added and removed with no gateway restart.

AddCustomDomain on the registry; within 5 s the session's gateway (its routes file rewritten
by its ``python -m gateway domains``) routes the domain to that tenant as it routes the
tenant's subdomain: a spoofed tenant header is replaced, another tenant's token refused,
CORS admits the domain's origin, the page is served there. RemoveCustomDomain; within 5 s
the domain reaches no tenant. The Envoy process is the same one throughout.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.tenant.v1 import tenant_registry_service_pb2 as pb

from deploy.local.stack import Stack
from gateway import domains
from gateway.__main__ import OVERLAYS, deploy_settings, overlay_values, overlays
from gateway.config import GatewaySettings, render, routes_template, stylesheet_path

from .grpcweb import Reply, call
from .support import bearer, free_port

LIST_SITES = "/towerco.sites.v1.SiteService/ListSites"
PERMISSION_DENIED = 7
#: The acceptance's bound: a change of the registry is served (or refused) within this.
WITHIN_SECONDS = 5.0


def fresh_domain() -> str:
    return f"aiops.{uuid.uuid4().hex[:10]}.operator.example"


def list_sites(settings: GatewaySettings, host: str, token: str, headers: dict[str, str] | None = None) -> Reply:
    return call(settings.port, host, LIST_SITES, sites_pb.ListSitesRequest(), token=token, headers=headers)


def site_ids(reply: Reply) -> list[str]:
    assert reply.status == 0, (reply.status, reply.message)
    return sorted(site.site_id for site in reply.one(sites_pb.ListSitesResponse).sites)


def until(check: Callable[[], bool], what: str) -> float:
    """Seconds until ``check()`` holds; fails past WITHIN_SECONDS."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < WITHIN_SECONDS, f"not within {WITHIN_SECONDS:g} s: {what}"
        time.sleep(0.05)
    return time.monotonic() - start


def refused_for_no_tenant(reply: Reply) -> bool:
    return (
        reply.status == PERMISSION_DENIED
        and reply.info is not None
        and reply.info.reason == "TENANT_SUBDOMAIN_REQUIRED"
    )


def preflight(settings: GatewaySettings, host: str, origin: str) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", settings.port, timeout=10)
    connection.request(
        "OPTIONS",
        LIST_SITES,
        headers={
            "Host": host,
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,x-grpc-web,x-user-agent",
        },
    )
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def page(settings: GatewaySettings, host: str, path: str = "/") -> tuple[int, str | None, str | None, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", settings.port, timeout=10)
    connection.request("GET", path, headers={"Host": host})
    response = connection.getresponse()
    shown = (
        response.status,
        response.getheader("content-type"),
        response.getheader("content-security-policy"),
        response.read(),
    )
    connection.close()
    return shown


def test_each_overlays_committed_routes_template_is_the_current_rendering_of_its_values():
    for overlay in overlays():
        committed = (OVERLAYS / overlay / "gateway-routes-template.json").read_text()
        current = routes_template(deploy_settings(overlay_values(overlay))).to_json()
        assert committed == current, f"{overlay}: run `make gateway-config`"


def test_a_cluster_gateway_reads_its_routes_from_the_file_its_sidecar_writes():
    settings = deploy_settings(overlay_values("prod"))
    manager = render(settings)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert "route_config" not in manager
    source = manager["rds"]["config_source"]["path_config_source"]
    assert source == {
        "path": f"{settings.routes_dir}/{domains.ROUTES_FILE}",
        "watched_directory": {"path": settings.routes_dir},
    }
    inline = render(replace(settings, routes_dir=""))["static_resources"]["listeners"][0]["filter_chains"][0]
    assert "rds" not in inline["filters"][0]["typed_config"], "without GATEWAY_ROUTES_DIR the routes are inline"


def test_each_custom_domain_is_the_apis_routes_naming_its_tenant_with_its_own_origins():
    template = routes_template(deploy_settings(overlay_values("prod")))
    api = template.route_config["virtual_hosts"][0]
    config = domains.route_config(template, {"b.operator.example": "tenant_b", "a.operator.example": "tenant_a"})
    first, *hosts = config["virtual_hosts"]
    assert first == api, "the API's own host is unchanged, and first"
    assert [h["domains"] for h in hosts] == [
        ["a.operator.example", "a.operator.example:8080"],
        ["b.operator.example", "b.operator.example:8080"],
    ]
    for host, tenant in zip(hosts, ("tenant_a", "tenant_b"), strict=True):
        assert len(host["routes"]) == len(api["routes"])
        for route in host["routes"]:
            assert route["metadata"]["filter_metadata"][domains.EDGE_FILTER] == {domains.TENANT_KEY: tenant}
        cors = host["typed_per_filter_config"][domains.CORS_FILTER]
        domain = host["domains"][0]
        assert cors["allow_origin_string_match"] == [{"exact": f"https://{domain}"}]
    assert "metadata" not in json.dumps(api), "the subdomains' routes name no tenant"


def test_the_routes_file_is_replaced_by_rename_and_only_when_the_map_changes(tmp_path: Path):
    template = routes_template(deploy_settings(overlay_values("dev")))
    assert domains.write_routes(tmp_path, template, {})
    path = tmp_path / domains.ROUTES_FILE
    first = path.stat().st_ino
    assert not domains.write_routes(tmp_path, template, {}), "the same map again writes nothing"
    assert path.stat().st_ino == first
    assert domains.write_routes(tmp_path, template, {"a.operator.example": "tenant_a"})
    assert path.stat().st_ino != first, "a new file renamed in, which Envoy's watch sees"
    (resource,) = json.loads(path.read_text())["resources"]
    assert resource["@type"] == domains.ROUTE_CONFIGURATION and len(resource["virtual_hosts"]) == 2
    assert [p.name for p in tmp_path.iterdir()] == [domains.ROUTES_FILE], "no partial file left behind"


@pytest.mark.stack
def test_a_custom_domain_is_routed_to_its_tenant_within_seconds_and_refused_once_removed(
    gateway, stack: Stack, registry, platform_token, tenant_pair, token, sites
):
    tenant_a, tenant_b = tenant_pair
    sites.CreateSite(
        sites_pb.CreateSiteRequest(site_id="CD-A-1", site=sites_pb.Site(name="on the custom domain")),
        metadata=bearer(token(tenant_a)),
        timeout=10,
    )
    envoy = stack.processes["gateway"]
    pid = envoy.pid
    domain = fresh_domain()
    host = f"{domain}:{gateway.port}"
    assert refused_for_no_tenant(list_sites(gateway, host, token(tenant_a))), "no tenant before it is added"

    registry.AddCustomDomain(
        pb.AddCustomDomainRequest(tenant_id=tenant_a, domain=domain), metadata=bearer(platform_token), timeout=10
    )
    until(lambda: list_sites(gateway, host, token(tenant_a)).status == 0, "the domain serves its tenant")
    assert site_ids(list_sites(gateway, host, token(tenant_a))) == ["CD-A-1"]
    assert site_ids(list_sites(gateway, domain, token(tenant_a))) == ["CD-A-1"], "the Host without a port too"

    # The tenant is the domain's, whatever the client says.
    spoof = {"X-Tenant-Id": tenant_b, "X-Towerco-Caller": "platform", "X-Jwt-Payload": "e30"}
    assert site_ids(list_sites(gateway, host, token(tenant_a), headers=spoof)) == ["CD-A-1"]
    foreign = list_sites(gateway, host, token(tenant_b))
    assert foreign.status == PERMISSION_DENIED and foreign.info is not None, foreign
    assert foreign.info.reason == "CROSS_TENANT_DENIED" and foreign.messages == []
    assert list_sites(gateway, host, "").status == 16, "a token is still required"

    # A browser on the domain may call the API from it; another origin may not.
    for origin in (f"https://{domain}", f"http://{domain}:{gateway.port}"):
        assert preflight(gateway, host, origin).getheader("access-control-allow-origin") == origin
    assert preflight(gateway, host, "https://evil.example").getheader("access-control-allow-origin") is None
    assert preflight(gateway, host, f"https://{tenant_b}.localhost").getheader("access-control-allow-origin") is None
    # The page, and the tenant's stylesheet, are served there as on the tenant's subdomain.
    subdomain = f"{tenant_a}.localhost:{gateway.port}"
    for path in ("/", stylesheet_path()):
        shown = page(gateway, host, path)
        assert shown[0] == 200 and shown == page(gateway, subdomain, path), (path, shown[:3])

    registry.RemoveCustomDomain(
        pb.RemoveCustomDomainRequest(tenant_id=tenant_a, domain=domain), metadata=bearer(platform_token), timeout=10
    )
    until(lambda: refused_for_no_tenant(list_sites(gateway, host, token(tenant_a))), "the removed domain is refused")
    assert preflight(gateway, host, f"https://{domain}").getheader("access-control-allow-origin") is None
    assert page(gateway, host, stylesheet_path())[0] != 200, "no tenant's stylesheet on a host naming none"
    # The subdomain never stopped, and neither did Envoy.
    assert site_ids(list_sites(gateway, f"{tenant_a}.localhost:{gateway.port}", token(tenant_a))) == ["CD-A-1"]
    assert stack.processes["gateway"].pid == pid and envoy.poll() is None, "the same Envoy process throughout"


async def test_a_registry_out_of_reach_leaves_the_routes_as_they_are(stack: Stack, tmp_path: Path):
    # A port nothing listens on: every poll fails, and no domain may be dropped for it.
    template = routes_template(deploy_settings(overlay_values("dev")))
    held = {"aiops.operator.example": "tenant_a"}
    domains.write_routes(tmp_path, template, held)
    before = (tmp_path / domains.ROUTES_FILE).read_text()
    settings = domains.SyncSettings.from_env({**stack.service_env(), "TENANT_TARGET": f"127.0.0.1:{free_port()}"})
    stop = asyncio.Event()
    syncing = asyncio.create_task(domains.sync(template, tmp_path, settings, 0.1, stop))
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.wait_for(syncing, 10)
    assert (tmp_path / domains.ROUTES_FILE).read_text() == before


@pytest.mark.stack
def test_two_gateways_each_follow_the_registry_on_their_own(
    gateway, stack: Stack, registry, platform_token, tenant_pair, token
):
    tenant_a, _ = tenant_pair
    ports = {"GATEWAY_PORT": str(free_port()), "GATEWAY_ADMIN_PORT": str(free_port())}
    second = stack.start_gateway(extra_env=ports, instance="gateway-replica")
    try:
        domain = fresh_domain()
        replicas = (gateway, second)

        def answers(replica: GatewaySettings) -> Reply:
            return list_sites(replica, f"{domain}:{replica.port}", token(tenant_a))

        request = pb.AddCustomDomainRequest(tenant_id=tenant_a, domain=domain)
        registry.AddCustomDomain(request, metadata=bearer(platform_token), timeout=10)
        until(lambda: all(answers(r).status == 0 for r in replicas), "both gateways serve the domain")
        removal = pb.RemoveCustomDomainRequest(tenant_id=tenant_a, domain=domain)
        registry.RemoveCustomDomain(removal, metadata=bearer(platform_token), timeout=10)
        until(lambda: all(refused_for_no_tenant(answers(r)) for r in replicas), "both gateways refuse it")
    finally:
        stack.stop("gateway-replica")
    assert "gateway-replica-domains" not in stack.processes, "the replica's sync stops with it"
