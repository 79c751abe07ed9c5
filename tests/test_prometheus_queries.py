"""The stack's Prometheus: it scrapes every service and the gateway, and (issue 15's
acceptance) after a known mix of calls by one tenant a PromQL query shows exactly those
counts for that tenant and nothing for the others.

The session's Prometheus scrapes the services every second. The tenant is fresh and its
read rate is 6 a minute, so its reads are partly refused; its counts are what the client
saw, call by call, sorted into outcomes by the services' own rule.
"""

from __future__ import annotations

import collections
import socket
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from towerco.sites.v1 import sites_service_pb2 as sites_pb

from deploy.local.prometheus import PrometheusError, query
from deploy.local.stack import Stack, StackConfig
from services.runtime.metrics import outcome

from .support import bearer
from .support.requests import set_limit


def _call(method: Callable[..., Any], request: Any, md: Any) -> str:
    """The outcome label of one call, by the status the caller got."""
    try:
        method(request, metadata=md, timeout=10)
    except grpc.RpcError as exc:
        return outcome(exc.code().name)
    return outcome("OK")


def _scraped(stack: Stack, service: str, tenant: str) -> dict[str, float]:
    """``towerco_tenant_calls_total`` of ``tenant`` by outcome, read from the service's /metrics."""
    port = stack.config.metrics_ports[service]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    counts: dict[str, float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "towerco_tenant_calls_total" and sample.labels["tenant"] == tenant:
                counts[sample.labels["outcome"]] += sample.value
    return dict(counts)


def _by_outcome(result: list[dict[str, Any]]) -> dict[str, float]:
    return {sample["metric"]["outcome"]: float(sample["value"][1]) for sample in result}


def test_a_tenants_known_mix_of_calls_is_what_prometheus_counts_for_it_and_nothing_for_the_others(
    stack: Stack,
    prometheus: str,
    sites: Any,
    features: Any,
    new_tenant: Callable[..., str],
    token: Callable[..., str],
    platform_token: str,
    eventually: Callable[..., Any],
) -> None:
    tenant, bystander = new_tenant(plan="basic"), new_tenant(plan="basic")
    set_limit(features, platform_token, tenant, "rpm_read", 6)
    md = bearer(token(tenant))
    made: collections.Counter[str] = collections.Counter()
    for _ in range(10):  # reads past the rate: refused
        made[_call(sites.ListSites, sites_pb.ListSitesRequest(page_size=1), md)] += 1
    for n in range(2):  # writes within it: ok
        site = sites_pb.Site(name=f"Metered {n}")
        request = sites_pb.CreateSiteRequest(site_id=f"MET-{n}", site=site, request_id=f"met-{uuid.uuid4().hex}")
        made[_call(sites.CreateSite, request, md)] += 1
    bad = sites_pb.CreateSiteRequest(site_id="not a site id!", site=sites_pb.Site(name="Bad"))
    made[_call(sites.CreateSite, bad, md)] += 1  # the request's fault: client_error
    assert made["ok"] >= 3 and made["refused"] >= 1 and made["client_error"] == 1, made
    expected = {name: float(count) for name, count in made.items()}

    # The service's own /metrics first, then what Prometheus scraped from it.
    assert _scraped(stack, "sites", tenant) == expected

    promql = f'sum by (outcome) (towerco_tenant_calls_total{{tenant="{tenant}", service="sites"}})'

    def counted() -> None:
        assert _by_outcome(query(prometheus, promql)) == expected

    eventually(counted, within=15)
    assert sum(made.values()) == 13
    limited = query(prometheus, f'sum(towerco_tenant_rate_limited_total{{tenant="{tenant}", service="sites"}})')
    assert [float(sample["value"][1]) for sample in limited] == [float(made["refused"])], limited
    # The bystander made no call to sites: not a single series of it there.
    assert query(prometheus, f'towerco_tenant_calls_total{{tenant="{bystander}", service="sites"}}') == []
    assert _scraped(stack, "sites", bystander) == {}


def test_prometheus_scrapes_every_services_metrics_port_and_the_gateways_admin_stats(
    stack: Stack, prometheus: str, eventually: Callable[..., Any]
) -> None:
    expected = {name: f"127.0.0.1:{port}" for name, port in stack.config.metrics_ports.items()}
    expected["gateway"] = f"127.0.0.1:{stack.config.gateway_admin_port}"

    def all_up() -> None:
        up = query(prometheus, "up")
        assert {sample["metric"]["job"]: sample["metric"]["instance"] for sample in up} == expected, up
        assert {sample["value"][1] for sample in up} == {"1"}, up

    eventually(all_up, within=10)
    # Envoy's own series come through its admin interface.
    assert query(prometheus, 'envoy_http_downstream_rq_total{envoy_http_conn_manager_prefix="gateway"}')


def test_prometheus_on_a_port_already_taken_fails_to_start_and_says_why(tmp_path: Path) -> None:
    stack = Stack(StackConfig(data_dir=tmp_path))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        with pytest.raises(PrometheusError, match="address already in use"):
            stack.start_prometheus(port=squatter.getsockname()[1])
    assert stack.processes["prometheus"].poll() is not None
