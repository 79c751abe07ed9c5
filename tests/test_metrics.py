"""Per-tenant metrics on the services' ``/metrics``, scraped from the session stack.

One fresh tenant makes a known mix of calls (successes, a client error, cross-tenant
refusals, a rate-limit refusal); the sites service's exposition must show exactly those
counts for it, and nothing for the tenant it tried to reach.
"""

from __future__ import annotations

import urllib.request
from collections import Counter
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from towerco.features.v1 import feature_gate_service_pb2 as features_pb
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc

from deploy.local.stack import Stack
from services.runtime import metrics
from services.runtime.bulkhead import Bulkhead
from services.runtime.errors import ServiceError

from .support import free_port

SITES = "sites"


def scrape(stack: Stack, service: str) -> list[Any]:
    """Every sample of ``service``'s ``/metrics``."""
    return scrape_port(stack.config.metrics_ports[service])


def scrape_port(port: int) -> list[Any]:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def values(samples: list[Any], name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples called ``name`` whose labels include ``labels``, by their other labels."""
    found = {}
    for sample in samples:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            rest = tuple(sorted((k, v) for k, v in sample.labels.items() if k not in labels))
            found[rest] = sample.value
    return found


def call(fn: Any, request: Any, metadata: Any, seen: Counter[str]) -> None:
    try:
        fn(request, metadata=metadata, timeout=10)
        seen["OK"] += 1
    except grpc.RpcError as error:
        seen[error.code().name] += 1


def test_a_tenants_calls_are_counted_by_outcome_on_the_sites_metrics_and_no_other_tenant_appears(
    stack, sites, features, new_tenant, token, platform_token, eventually
):
    tenant, other = new_tenant(plan="basic"), new_tenant(plan="basic")
    own = (("authorization", f"Bearer {token(tenant)}"),)
    foreign = (*own, ("x-tenant-id", other))
    reads: Counter[str] = Counter()

    for _ in range(3):
        call(sites.ListSites, pb.ListSitesRequest(page_size=1), own, reads)
    call(sites.GetSite, pb.GetSiteRequest(site_id="no-such-site"), own, reads)
    for _ in range(2):
        call(sites.ListSites, pb.ListSitesRequest(page_size=1), foreign, reads)
    assert reads == {"OK": 3, "NOT_FOUND": 1, "PERMISSION_DENIED": 2}

    # Its read rate down to 6 a minute: once the burst is spent, the next read is refused.
    features.SetLimitOverride(
        features_pb.SetLimitOverrideRequest(tenant_id=tenant, resource="rpm_read", limit=6),
        metadata=(("authorization", f"Bearer {platform_token}"),),
        timeout=10,
    )
    for _ in range(200):
        call(sites.ListSites, pb.ListSitesRequest(page_size=1), own, reads)
        if reads["RESOURCE_EXHAUSTED"]:
            break
    assert reads["RESOURCE_EXHAUSTED"] == 1, reads

    def counted() -> list[Any]:
        # A call is recorded as its handler ends, which may be a moment after the client has
        # its answer: scrape until the last one is in (exactly these counts, never more).
        samples = scrape(stack, SITES)
        calls = values(samples, "towerco_tenant_calls_total", tenant=tenant, service=SITES)
        assert calls == {
            (("outcome", "ok"), ("rate_class", "read")): reads["OK"],
            (("outcome", "client_error"), ("rate_class", "read")): 1,
            (("outcome", "refused"), ("rate_class", "read")): 3,
        }
        return samples

    samples = eventually(counted, within=5.0, interval=0.1)
    total = reads.total()
    assert values(samples, "towerco_tenant_call_duration_seconds_count", tenant=tenant) == {
        (("service", SITES),): total
    }
    assert values(samples, "towerco_tenant_rate_limited_total", tenant=tenant) == {
        (("rate_class", "read"), ("service", SITES)): 1
    }
    assert values(samples, "towerco_cross_tenant_refusals_total", target=other) == {(("service", SITES),): 2}
    # Its reads that ran touched the database: the time is counted as its own.
    db_seconds = values(samples, "towerco_tenant_db_seconds_total", tenant=tenant, service=SITES)
    assert list(db_seconds) == [()] and db_seconds[()] > 0
    # Per method, the client error is there by its code (all tenants: at least this one's).
    not_found = values(
        samples, "towerco_rpc_calls_total", service=SITES, method="/towerco.sites.v1.SiteService/GetSite"
    )
    assert not_found[(("code", "NOT_FOUND"),)] >= 1

    # The tenant it tried to reach made no call: no series names it as a tenant.
    assert [s for s in samples if s.labels.get("tenant") == other] == []
    # The feature gate's calls made for them (its entitlements, the platform's override) are
    # the platform's, not theirs; the database time spent on their rows is theirs.
    gate = [s for s in scrape(stack, "features") if s.labels.get("tenant") in (tenant, other)]
    assert gate and {s.name for s in gate} == {"towerco_tenant_db_seconds_total"}


def test_metrics_label_values_are_bounded(stack, sites, new_tenant, token):
    """No label of the sites exposition carries a free-form value: only known label names."""
    tenant = new_tenant(plan="basic")
    md = (("authorization", f"Bearer {token(tenant)}"),)
    call(sites.GetSite, pb.GetSiteRequest(site_id="free-form-site-id"), md, Counter())
    samples = scrape(stack, SITES)
    towerco = [s for s in samples if s.name.startswith("towerco_")]
    assert towerco
    allowed = {"tenant", "service", "rate_class", "outcome", "method", "code", "result", "dependency", "target", "le"}
    assert {k for s in towerco for k in s.labels} <= allowed
    assert not [s for s in towerco if "free-form-site-id" in s.labels.values()]


def test_platform_health_is_on_the_metrics_of_every_service(stack, sites, new_tenant, token, eventually):
    tenant = new_tenant(plan="basic")
    md = (("authorization", f"Bearer {token(tenant)}"),)
    for _ in range(2):
        sites.ListSites(pb.ListSitesRequest(page_size=1), metadata=md, timeout=10)

    def measured() -> list[Any]:
        samples = scrape(stack, SITES)
        # The relay measures its outbox every second: depth and lag of the sites service.
        assert values(samples, "towerco_audit_outbox_depth", service=SITES)
        assert values(samples, "towerco_audit_relay_lag_seconds", service=SITES)
        return samples

    samples = eventually(measured, within=5.0)
    # The tenant's state and entitlements were looked up for each call: in memory after the first.
    cache = values(samples, "towerco_tenant_cache_requests_total", service=SITES)
    assert cache[(("result", "hit"),)] >= 1 and cache[(("result", "miss"),)] >= 1
    for service in ("tenant", "features", "audit"):
        assert any(s.name == "towerco_rpc_calls_total" for s in scrape(stack, service)), service


def test_past_the_cap_new_tenants_share_one_label_value() -> None:
    recorder = metrics.ServiceMetrics("cap_test", tenant_label_cap=2)
    for tenant in ("cap_a", "cap_b", "cap_c", "cap_d", "cap_a"):
        recorder.call(tenant, "read", "/towerco.sites.v1.SiteService/GetSite", "OK", 0.001)
    counted = {
        sample.labels["tenant"]: sample.value
        for family in metrics.TENANT_CALLS.collect()
        for sample in family.samples
        if sample.labels["service"] == "cap_test"
    }
    assert counted == {"cap_a": 2, "cap_b": 1, metrics.OTHER_TENANT: 2}


def test_a_status_becomes_the_outcome_the_slos_count() -> None:
    assert metrics.outcome("OK") == "ok"
    assert {metrics.outcome(c) for c in ("UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED")} == {"refused"}
    assert {metrics.outcome(c) for c in ("INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "UNKNOWN")} == {"server_error"}
    assert {metrics.outcome(c) for c in ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "ABORTED")} == {
        "client_error"
    }


def test_two_processes_of_a_service_sharing_a_multiprocess_folder_both_serve_the_sum(
    extra_service, new_tenant, token, tmp_path
):
    folder = tmp_path / "prometheus-multiproc"
    folder.mkdir()
    ports = [free_port(), free_port()]
    workers = [
        extra_service("sites", env={"PROMETHEUS_MULTIPROC_DIR": str(folder), "SITES_METRICS_PORT": str(port)})
        for port in ports
    ]
    tenant = new_tenant(plan="basic")
    md = (("authorization", f"Bearer {token(tenant)}"),)
    for worker, calls in zip(workers, (2, 3), strict=True):
        with grpc.insecure_channel(worker.target) as channel:
            stub = sites_grpc.SiteServiceStub(channel)
            for _ in range(calls):
                stub.ListSites(pb.ListSitesRequest(page_size=1), metadata=md, timeout=10)
    for port in ports:
        calls_seen = values(scrape_port(port), "towerco_tenant_calls_total", tenant=tenant, service=SITES)
        assert calls_seen == {(("outcome", "ok"), ("rate_class", "read")): 5}, port


def test_redis_errors_and_the_open_breaker_show_until_redis_answers_again(
    extra_service, private_redis, new_tenant, token, eventually
):
    port = free_port()
    worker = extra_service("sites", env={"REDIS_URL": private_redis.url, "SITES_METRICS_PORT": str(port)})
    tenant = new_tenant(plan="basic")
    md = (("authorization", f"Bearer {token(tenant)}"),)
    with grpc.insecure_channel(worker.target) as channel:
        stub = sites_grpc.SiteServiceStub(channel)

        def list_sites() -> None:
            stub.ListSites(pb.ListSitesRequest(page_size=1), metadata=md, timeout=10)

        list_sites()
        before = values(scrape_port(port), "towerco_dependency_errors_total", service=SITES, dependency="redis")
        assert values(scrape_port(port), "towerco_breaker_open", service=SITES, dependency="redis") in ({}, {(): 0})

        private_redis.stop()
        list_sites()  # decided without Redis (its share of the rate, locally)
        samples = scrape_port(port)
        errors = values(samples, "towerco_dependency_errors_total", service=SITES, dependency="redis")
        assert errors[()] > before.get((), 0)
        assert values(samples, "towerco_breaker_open", service=SITES, dependency="redis") == {(): 1}

        private_redis.restart()

        def closed() -> None:
            list_sites()
            assert values(scrape_port(port), "towerco_breaker_open", service=SITES, dependency="redis") == {(): 0}

        # The caches ask Redis again once their memory of the tenant is older than TENANT_CACHE_SECONDS.
        eventually(closed, within=30.0, interval=0.5)


async def test_bulkhead_waits_and_refusals_are_counted() -> None:
    service = metrics.active().service

    def counted() -> tuple[float, float]:
        waits = metrics.BULKHEAD_WAITS.labels(service)._value.get()
        return waits, metrics.BULKHEAD_REFUSALS.labels(service)._value.get()

    before = counted()
    heads = Bulkhead(pool_size=3, wait_seconds=0.05)
    async with heads.slot("bh_tenant", 1):
        with pytest.raises(ServiceError):
            async with heads.slot("bh_tenant", 1):
                pass
    assert counted() == (before[0] + 1, before[1] + 1)
