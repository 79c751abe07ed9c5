"""The gateway's configuration: one template, valid for Envoy 1.40, routes from the protos.

What the configuration does to requests is tested through the running Envoy in
``test_gateway.py``; here is what can be read off the rendering itself.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

from deploy.local.tokens import ensure_keys
from gateway.__main__ import OVERLAYS, deploy_settings, overlay_values, overlays
from gateway.config import (
    API_PREFIX,
    CLIENT_REQUEST_ID_HEADER,
    FAULT_DELAY_HEADER,
    FAULT_HEADER_PREFIX,
    HELD_REFUSAL_HEADERS,
    IDENTITY_HEADERS,
    INTERNAL_PREFIX,
    TENANT_ISSUER_HEADER,
    TOKEN_TENANT_HEADER,
    TRANSCODER,
    WEB_FILES,
    GatewaySettings,
    apis,
    origin_matchers,
    render,
    render_json,
    routes_template,
    served_services,
    stylesheet_path,
)
from gateway.domains import route_config
from gateway.envoy import validate
from services.runtime.settings import SettingsError

REPO = Path(__file__).resolve().parents[1]


def dev_settings(tmp_path: Path) -> GatewaySettings:
    ensure_keys(tmp_path / "keys")  # the dev JWKS the gateway reads
    return GatewaySettings.from_env({"DATA_DIR": str(tmp_path), "GATEWAY_WEB_DIR": "/none"})


def prod_settings() -> GatewaySettings:
    return deploy_settings(overlay_values("prod"))


@pytest.mark.parametrize("flavor", ["dev", "prod"])
def test_envoy_validates_the_rendering_without_deprecation_warnings(tmp_path, flavor):
    settings = dev_settings(tmp_path) if flavor == "dev" else prod_settings()
    path = tmp_path / f"{flavor}.json"
    path.write_text(render_json(settings))
    output = validate(path)  # raises on an error or a deprecation warning
    assert f"configuration '{path}' OK" in output


def test_each_overlays_committed_gateway_config_is_the_current_rendering_of_its_values():
    assert overlays() == ["dev", "prod"]
    for overlay in overlays():
        committed = (OVERLAYS / overlay / "gateway-envoy.json").read_text()
        assert committed == render_json(deploy_settings(overlay_values(overlay))), (
            f"{overlay}: run `make gateway-config`"
        )


def test_an_overlays_values_are_what_its_gateway_is_rendered_with():
    values = overlay_values("prod")
    settings = prod_settings()
    assert (settings.base_domain, settings.jwt_issuer, settings.jwt_jwks_url) == (
        values["BASE_DOMAIN"],
        values["JWT_ISSUER"],
        values["JWT_JWKS_URL"],
    )
    assert settings.cors_origins == (values["GATEWAY_CORS_ORIGINS"],)
    with pytest.raises(SettingsError, match="no overlay 'staging'"):
        overlay_values("staging")


def test_every_public_service_is_routed_and_no_internal_one():
    routed = {prefix: api.cluster for api in apis() for prefix in api.prefixes}
    assert routed == {
        "/towerco.tenant.v1.TenantRegistryService/": "tenant",
        "/towerco.tenant.v1.SsoConfigService/": "tenant",
        "/towerco.tenant.v1.UserService/": "tenant",
        "/towerco.sites.v1.SiteService/": "sites",
        "/towerco.features.v1.FeatureGateService/": "features",
        "/towerco.audit.v1.AuditLogService/": "audit",
    }
    public = {path for api in apis() for path in api.public_paths}
    assert public == {
        "/towerco.tenant.v1.TenantRegistryService/GetBranding",
        "/towerco.tenant.v1.TenantRegistryService/GetBrandingStylesheet",
        "/towerco.tenant.v1.TenantRegistryService/ResolveTenant",
    }


def _listener_manager(config: dict[str, Any]) -> dict[str, Any]:
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (manager,) = chain["filters"]
    typed: dict[str, Any] = manager["typed_config"]
    return typed


def _http_filter(config: dict[str, Any], name: str) -> dict[str, Any]:
    (typed,) = [f["typed_config"] for f in _listener_manager(config)["http_filters"] if f["name"] == name]
    return typed  # type: ignore[no-any-return]


def test_upstreams_speak_http2_with_health_checks_and_outlier_detection(tmp_path):
    config = render(dev_settings(tmp_path))
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert set(clusters) == {"tenant", "sites", "features", "audit"}
    readiness = {api.cluster: api.health_service for api in apis()}
    assert readiness["sites"] == "towerco.sites.v1.SiteService"
    for name, service in readiness.items():
        assert service in {s.full_name for s in served_services()[name]}, (name, service)
    for cluster in clusters.values():
        options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        assert "http2_protocol_options" in options["explicit_http_config"]
        # Readiness (the service's own name: its database answers), not the process's liveness ("").
        assert cluster["health_checks"][0]["grpc_health_check"] == {"service_name": readiness[cluster["name"]]}
        assert cluster["outlier_detection"]["consecutive_gateway_failure"] > 0
    routes = _listener_manager(config)["route_config"]["virtual_hosts"][0]["routes"]
    for route in routes:
        if "route" in route:
            assert route["route"]["timeout"] == "15s"


def test_filters_run_in_order_and_the_admin_interface_is_loopback_only(tmp_path):
    config = render(dev_settings(tmp_path))
    filters = [f["name"].rsplit(".", 1)[-1] for f in _listener_manager(config)["http_filters"]]
    assert filters == [
        "health_check",
        "grpc_web",
        "cors",
        "intake",  # request ids, gRPC replies, tenant issuers: one Lua filter
        "jwt_authn",
        "edge_identity",  # edge identity and the penalty box: one Lua filter
        "fault",  # holds the penalty box's refusals, and nothing else
        "router",
    ]
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_a_clients_identity_and_internal_headers_are_removed_before_any_filter_reads_them(tmp_path):
    manager = _listener_manager(render(dev_settings(tmp_path)))
    identity, request_id = (m["typed_config"]["mutations"] for m in manager["early_header_mutation_extensions"])
    assert identity == [
        *({"remove": name} for name in IDENTITY_HEADERS),
        {"remove_on_match": {"key_matcher": {"prefix": INTERNAL_PREFIX}}},
        {"remove_on_match": {"key_matcher": {"prefix": FAULT_HEADER_PREFIX}}},
    ]
    # Then the client's request id is set aside under the prefix, for request_id.lua, not removed with it.
    assert request_id[1]["append"]["header"]["key"] == CLIENT_REQUEST_ID_HEADER
    # The marks the gateway's filters read are under the prefix, so a client cannot send its own:
    # the token's tenant the penalty box trusts, and the tenant issuer mark jwt_authn lets pass.
    assert TOKEN_TENANT_HEADER.startswith(INTERNAL_PREFIX) and TENANT_ISSUER_HEADER.startswith(INTERNAL_PREFIX)
    provider = _http_filter(render(dev_settings(tmp_path)), "envoy.filters.http.jwt_authn")["providers"]["towerco"]
    assert provider["claim_to_headers"] == [{"header_name": TOKEN_TENANT_HEADER, "claim_name": "tenant_id"}]
    assert "payload_in_metadata" not in provider  # the claims as metadata cost every call; the box needs one


def test_the_penalty_box_s_held_refusals_are_answered_first_on_every_host_after_the_fault_filter(tmp_path):
    """The hold route comes first in every virtual host, custom domains' too, matched on a header
    no client can send (under the internal prefix); the fault filter delays only such calls, by
    the header the box sets (a client's fault headers are removed on arrival)."""
    settings = dev_settings(tmp_path)
    config = route_config(routes_template(settings), {"status.example.com": "tenant_a"})
    assert len(config["virtual_hosts"]) == 2
    details = HELD_REFUSAL_HEADERS["details"]
    assert all(name.startswith(INTERNAL_PREFIX) for name in HELD_REFUSAL_HEADERS.values())
    for host in config["virtual_hosts"]:
        first = host["routes"][0]
        assert first["match"]["headers"] == [{"name": details, "present_match": True}], host["name"]
        assert "route" not in first and first["direct_response"] == {"status": 200}
        added = {h["header"]["key"]: h["header"]["value"] for h in first["response_headers_to_add"]}
        assert added["grpc-status"] == "8" and added["grpc-status-details-bin"] == f"%REQ({details})%"
    fault = _http_filter(render(settings), "envoy.filters.http.fault")
    assert fault["headers"] == [{"name": details, "present_match": True}]
    assert "header_delay" in fault["delay"] and "abort" not in fault and "response_rate_limit" not in fault
    assert FAULT_DELAY_HEADER.startswith(FAULT_HEADER_PREFIX)


def test_the_transcoder_runs_on_the_pages_stylesheet_route_only(tmp_path):
    web = tmp_path / "web"
    web.mkdir()
    for name, _ in WEB_FILES.values():
        (web / name).write_text(name)
    ensure_keys(tmp_path / "keys")
    settings = GatewaySettings.from_env({"DATA_DIR": str(tmp_path), "GATEWAY_WEB_DIR": str(web)})
    config = render(settings)
    (transcoder,) = [f for f in _listener_manager(config)["http_filters"] if f["name"] == TRANSCODER]
    assert transcoder["disabled"] is True and transcoder["typed_config"]["services"] == []  # nothing by default
    (host,) = _listener_manager(config)["route_config"]["virtual_hosts"]
    enabled = [route for route in host["routes"] if TRANSCODER in route.get("typed_per_filter_config", {})]
    (route,) = enabled
    assert stylesheet_path() == "/branding.css"
    assert route["match"] == {
        "path": "/branding.css",
        "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
    }
    assert route["route"]["cluster"] == "tenant"
    on = route["typed_per_filter_config"][TRANSCODER]["config"]
    assert on["services"] == ["towerco.tenant.v1.TenantRegistryService"] and on["match_incoming_request_route"]
    files = descriptor_pb2.FileDescriptorSet.FromString(base64.b64decode(on["proto_descriptor_bin"]))
    names = [file.name for file in files.file]
    registry_file = "towerco/tenant/v1/tenant_registry_service.proto"
    assert {
        registry_file,
        "google/api/httpbody.proto",
        "google/rpc/status.proto",
        "google/rpc/error_details.proto",
    } <= set(names)
    assert len(names) == len(set(names))  # each file once, imports before their importers
    assert names.index("google/api/httpbody.proto") < names.index(registry_file)
    path = tmp_path / "web.json"
    path.write_text(render_json(settings))
    assert f"configuration '{path}' OK" in validate(path)  # Envoy takes it, deprecation-free
    # Without a page there is no stylesheet route, and no transcoder at all.
    assert TRANSCODER not in {f["name"] for f in _listener_manager(render(dev_settings(tmp_path)))["http_filters"]}


def test_the_token_rule_pins_issuer_and_audience_and_spares_only_public_rpcs(tmp_path):
    config = render(dev_settings(tmp_path))
    jwt = _http_filter(config, "envoy.filters.http.jwt_authn")
    provider = jwt["providers"]["towerco"]
    assert provider["issuer"] == "towerco-dev-issuer" and provider["audiences"] == ["towerco-aiops"]
    assert provider["forward"] is True
    assert "local_jwks" in provider
    unguarded = [rule["match"].get("path") for rule in jwt["rules"] if "requires" not in rule]
    # Public RPCs, and calls tenant_issuer.lua marked as a tenant issuer's (the services verify those).
    assert sorted(unguarded[:-1]) == sorted(p for api in apis() for p in api.public_paths)
    tenant_tokens = {"prefix": API_PREFIX, "headers": [{"name": TENANT_ISSUER_HEADER, "present_match": True}]}
    assert jwt["rules"][-2] == {"match": tenant_tokens}
    assert jwt["rules"][-1] == {"match": {"prefix": API_PREFIX}, "requires": {"provider_name": "towerco"}}
    remote = render(prod_settings())
    deployed = _http_filter(remote, "envoy.filters.http.jwt_authn")["providers"]["towerco"]
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


def _api_routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    routes = _listener_manager(config)["route_config"]["virtual_hosts"][0]["routes"]
    return [route for route in routes if "route" in route]


def test_every_api_route_retries_only_calls_that_were_not_processed_on_another_host(tmp_path):
    config = render(dev_settings(tmp_path))
    routes = _api_routes(config)
    assert len(routes) == sum(len(api.prefixes) for api in apis())
    for route in routes:
        policy = route["route"]["retry_policy"]
        # UNAVAILABLE is the services' "not processed" (as during their shutdown); the others
        # never reached a service. A reset after sending, 5xx, CANCELLED or a timeout may have.
        assert set(policy["retry_on"].split(",")) == {
            "unavailable",
            "connect-failure",
            "refused-stream",
            "reset-before-request",
        }
        assert policy["num_retries"] >= 1
        predicates = [p["name"] for p in policy["retry_host_predicate"]]
        assert predicates == ["envoy.retry_host_predicates.previous_hosts"]
        assert policy["host_selection_retry_max_attempts"] > 1
    for cluster in config["static_resources"]["clusters"]:
        (threshold,) = cluster["circuit_breakers"]["thresholds"]
        assert 0 < threshold["retry_budget"]["budget_percent"]["value"] <= 25, (
            "retries cannot pile up on a failing service"
        )


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The rendering of settings that change every connection limit from its default."""
    settings = GatewaySettings.from_env(
        {
            "DATA_DIR": str(tmp_path_factory.mktemp("tuned")),
            "GATEWAY_WEB_DIR": "/none",
            "GATEWAY_MAX_CONNECTIONS": "1234",
            "GATEWAY_FIRST_BYTES_TIMEOUT_SECONDS": "3",
            "GATEWAY_IDLE_TIMEOUT_SECONDS": "40",
            "GATEWAY_MAX_HEAP_MB": "300",
        }
    )
    return render(settings)


def test_a_connection_that_sends_nothing_is_closed_on_the_first_bytes_timeout(tuned):
    (listener,) = tuned["static_resources"]["listeners"]
    assert [f["name"] for f in listener["listener_filters"]] == ["envoy.filters.listener.http_inspector"]
    assert (listener["listener_filters_timeout"], listener["continue_on_listener_filters_timeout"]) == ("3s", False)


def test_an_idle_connection_is_closed_on_the_idle_timeout(tuned):
    assert _listener_manager(tuned)["common_http_protocol_options"]["idle_timeout"] == "40s"


def test_slow_request_headers_and_dead_http2_peers_are_timed_out(tuned):
    manager = _listener_manager(tuned)
    assert manager["request_headers_timeout"] == "5s"
    assert manager["http2_protocol_options"]["connection_keepalive"]["timeout"]


def test_a_connection_buffers_at_most_64_kib(tuned):
    (listener,) = tuned["static_resources"]["listeners"]
    assert listener["per_connection_buffer_limit_bytes"] <= 65536


def test_the_overload_manager_caps_connections_and_heap_at_the_settings(tuned):
    connections, heap = tuned["overload_manager"]["resource_monitors"]
    assert connections["typed_config"]["max_active_downstream_connections"] == 1234
    assert heap["typed_config"]["max_heap_size_bytes"] == 300 * 2**20


def test_as_the_heap_fills_idle_connections_are_the_first_to_go(tuned):
    overload = tuned["overload_manager"]
    _, heap = overload["resource_monitors"]
    actions = {action["name"].rsplit(".", 1)[-1]: action for action in overload["actions"]}
    (scaled,) = actions["reduce_timeouts"]["typed_config"]["timer_scale_factors"]
    assert scaled == {"timer": "HTTP_DOWNSTREAM_CONNECTION_IDLE", "min_timeout": "1s"}
    assert actions["reduce_timeouts"]["triggers"][0]["name"] == heap["name"]
    assert {"shrink_heap", "stop_accepting_requests"} <= set(actions)


def test_by_default_idle_connections_close_after_15_s_and_silent_ones_after_5_s():
    defaults = render(prod_settings())
    assert _listener_manager(defaults)["common_http_protocol_options"]["idle_timeout"] == "15s"
    assert defaults["static_resources"]["listeners"][0]["listener_filters_timeout"] == "5s"


def test_the_gateway_keeps_request_ids_by_the_services_rule():
    from gateway.config import lua_pattern
    from services.runtime.ids import REQUEST_ID

    # The Lua pattern as Python reads it: ^[chars]+$, each punctuation escaped with %.
    lua = lua_pattern(REQUEST_ID)
    assert lua.startswith("^[") and lua.endswith("]+$")
    allowed = set(lua[2:-3].replace("%", ""))
    assert REQUEST_ID.max_length == 64
    for sample in ["abc", "A-1.b:c_d", "x" * 64, "x" * 65, "a b", "a;b", "", "é", "%", "a%b", "[x]"]:
        lua_keeps = 0 < len(sample) <= REQUEST_ID.max_length and set(sample) <= allowed
        assert lua_keeps == REQUEST_ID.matches(sample), sample


def test_envoys_own_errors_are_marked_for_the_grpc_replies_filter(tmp_path):
    from gateway.config import LOCAL_REPLY_HEADER

    mappers = _listener_manager(render(dev_settings(tmp_path)))["local_reply_config"]["mappers"]
    for mapper in mappers:
        (header,) = mapper["headers_to_add"]
        assert header["header"]["key"] == LOCAL_REPLY_HEADER
    assert mappers[-1]["headers_to_add"][0]["header"]["value"] == "%RESPONSE_CODE%"


def test_a_service_with_several_targets_is_balanced_over_all_of_them(tmp_path):
    settings = GatewaySettings.from_env(
        {"DATA_DIR": str(tmp_path), "GATEWAY_WEB_DIR": "/none", "SITES_TARGET": "10.0.0.1:50052, 10.0.0.2:50052"}
    )
    (sites,) = [c for c in render(settings)["static_resources"]["clusters"] if c["name"] == "sites"]
    (locality,) = sites["load_assignment"]["endpoints"]
    addresses = [e["endpoint"]["address"]["socket_address"]["address"] for e in locality["lb_endpoints"]]
    assert (sites["type"], addresses) == ("STATIC", ["10.0.0.1", "10.0.0.2"])
