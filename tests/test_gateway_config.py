"""The gateway's configuration: one template, valid for Envoy 1.40, routes from the protos.

What the configuration does to requests is tested through the running Envoy in
``test_gateway.py``; here is what can be read off the rendering itself.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from deploy.local.tokens import ensure_keys
from gateway.__main__ import deploy_settings, kubernetes_configmap
from gateway.config import API_PREFIX, GatewaySettings, apis, origin_matchers, render, render_json
from gateway.envoy import validate
from services.runtime.settings import SettingsError

REPO = Path(__file__).resolve().parents[1]


def dev_settings(tmp_path: Path) -> GatewaySettings:
    ensure_keys(tmp_path / "keys")  # the dev JWKS the gateway reads
    return GatewaySettings.from_env({"DATA_DIR": str(tmp_path), "GATEWAY_WEB_DIR": "/none"})


@pytest.mark.parametrize("flavor", ["dev", "deploy"])
def test_envoy_validates_the_rendering_without_deprecation_warnings(tmp_path, flavor):
    settings = dev_settings(tmp_path) if flavor == "dev" else deploy_settings()
    path = tmp_path / f"{flavor}.json"
    path.write_text(render_json(settings))
    output = validate(path)  # raises on an error or a deprecation warning
    assert f"configuration '{path}' OK" in output


def test_the_committed_kubernetes_config_is_the_current_rendering():
    committed = (REPO / "deploy" / "kubernetes" / "gateway-config.yaml").read_text()
    assert committed == kubernetes_configmap(render_json(deploy_settings())), "run `make gateway-config`"


def test_every_public_service_is_routed_and_no_internal_one():
    routed = {prefix: api.cluster for api in apis() for prefix in api.prefixes}
    assert routed == {
        "/towerco.tenant.v1.TenantRegistryService/": "tenant",
        "/towerco.sites.v1.SiteService/": "sites",
        "/towerco.features.v1.FeatureGateService/": "features",
        "/towerco.audit.v1.AuditLogService/": "audit",
    }
    public = {path for api in apis() for path in api.public_paths}
    assert public == {
        "/towerco.tenant.v1.TenantRegistryService/GetBranding",
        "/towerco.tenant.v1.TenantRegistryService/ResolveTenant",
    }


def _listener_manager(config: dict[str, Any]) -> dict[str, Any]:
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (manager,) = chain["filters"]
    typed: dict[str, Any] = manager["typed_config"]
    return typed


def test_upstreams_speak_http2_with_health_checks_and_outlier_detection(tmp_path):
    config = render(dev_settings(tmp_path))
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert set(clusters) == {"tenant", "sites", "features", "audit"}
    for cluster in clusters.values():
        options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        assert "http2_protocol_options" in options["explicit_http_config"]
        assert cluster["health_checks"][0]["grpc_health_check"] == {}
        assert cluster["outlier_detection"]["consecutive_gateway_failure"] > 0
    routes = _listener_manager(config)["route_config"]["virtual_hosts"][0]["routes"]
    for route in routes:
        if "route" in route:
            assert route["route"]["timeout"] == "15s"


def test_filters_run_in_order_and_the_admin_interface_is_loopback_only(tmp_path):
    config = render(dev_settings(tmp_path))
    filters = [f["name"].rsplit(".", 1)[-1] for f in _listener_manager(config)["http_filters"]]
    assert filters == ["grpc_web", "cors", "grpc_replies", "jwt_authn", "edge_identity", "router"]
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_the_token_rule_pins_issuer_and_audience_and_spares_only_public_rpcs(tmp_path):
    config = render(dev_settings(tmp_path))
    jwt = _listener_manager(config)["http_filters"][3]["typed_config"]
    provider = jwt["providers"]["towerco"]
    assert provider["issuer"] == "towerco-dev-issuer" and provider["audiences"] == ["towerco-aiops"]
    assert provider["forward"] is True
    assert "local_jwks" in provider
    unguarded = [rule["match"]["path"] for rule in jwt["rules"] if "requires" not in rule]
    assert sorted(unguarded) == sorted(p for api in apis() for p in api.public_paths)
    assert jwt["rules"][-1] == {"match": {"prefix": API_PREFIX}, "requires": {"provider_name": "towerco"}}
    remote = render(deploy_settings())
    deployed = _listener_manager(remote)["http_filters"][3]["typed_config"]["providers"]["towerco"]
    assert "async_fetch" in deployed["remote_jwks"]
    assert "local_jwks" not in deployed


def test_allowed_origins_are_exact_or_one_domains_tenant_subdomains():
    (subdomains,) = origin_matchers(["http://*.localhost:8080"])
    pattern = re.compile(subdomains["safe_regex"]["regex"])
    assert pattern.match("http://tenant_a.localhost:8080")
    for other in ("http://evil.example", "http://a.b.localhost:8080", "https://tenant_a.localhost:8080", "null"):
        assert not pattern.match(other), other
    assert origin_matchers(["https://app.example.com"]) == [{"exact": "https://app.example.com"}]


@pytest.mark.parametrize(
    "origin", ["*", "https://*", "http://*.*.example", "https://app.example.com/path", "app.example"]
)
def test_an_origin_matcher_that_admits_too_much_is_refused(origin):
    with pytest.raises(SettingsError):
        origin_matchers([origin])
