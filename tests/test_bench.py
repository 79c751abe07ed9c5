"""The benchmark's own parts (``tests/bench``), proven without timing anything: figures are judged
against their floors and written as JSON (the README's table and a comparison of two runs are
made from it); the bare floor server answers GetSite as the sites service does; the flood
generator stops by itself and accounts for every call it sent."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as pb_grpc

from deploy.local.stack import Stack
from deploy.local.tokens import ensure_keys
from gateway.config import GatewaySettings
from gateway.envoy import validate
from tests.bench.envoy_cost import VARIANTS
from tests.bench.own_processes import running, start, stop
from tests.bench.results import (
    Figure,
    Results,
    above_floor_at_most,
    at_most,
    compare,
    markdown,
    ratio_at_least,
    ratio_at_most,
)
from tests.bench.timing import percentile, ratio_interval
from tests.support import bearer, free_port
from tests.support.requests import set_limit


def test_bench_figures_are_judged_against_their_floor_and_written_as_json(tmp_path: Path) -> None:
    results = Results()
    results.add(Figure("service p50", 1.2, "ms", 1.0, "bare", ratio_at_most(1.15)))
    results.add(Figure("limited p50", 1.2, "ms", 1.0, "bare", ratio_at_most(1.25)))
    results.add(Figure("gateway p50", 1.5, "ms", 1.0, "direct", above_floor_at_most(0.3)))
    results.add(Figure("errors", 0, "calls", target=at_most(0)))
    results.add(Figure("two workers", 1700, "calls/s", 1000, "one worker", ratio_at_least(1.6)))
    results.add(Figure("asyncpg alone", 0.5, "ms"))
    path = tmp_path / "bench-results.json"
    results.write(path, "quick")

    rows = {row["name"]: row for row in json.loads(path.read_text())["figures"]}
    assert [rows[n]["verdict"] for n in ("service p50", "limited p50", "gateway p50", "errors", "two workers")] == [
        "MISS",
        "PASS",
        "MISS",
        "PASS",
        "PASS",
    ]
    assert rows["service p50"] == {
        "name": "service p50",
        "value": 1.2,
        "unit": "ms",
        "floor": 1.0,
        "floor_name": "bare",
        "target": "<= 1.15x floor",
        "note": "",
        "ratio": 1.2,
        "verdict": "MISS",
    }
    assert rows["asyncpg alone"]["target"] is None and rows["asyncpg alone"]["verdict"] is None
    assert results.summary().endswith("3 of 5 targets met")
    table = markdown(json.loads(path.read_text())).splitlines()
    assert "| service p50 | 1.20 ms | 1 ms (bare) | 1.20x | <= 1.15x floor | MISS |" in table
    assert len(table) == 2 + len(rows)
    judged = markdown(json.loads(path.read_text()), judged_only=True).splitlines()
    assert len(judged) == 2 + 5 and not any("asyncpg alone" in line for line in judged)
    later = json.loads(path.read_text())
    later["figures"][0]["value"] = 0.6
    lines = compare(json.loads(path.read_text()), later).splitlines()
    assert lines[1].split() == ["service", "p50", "1.20", "0.600", "x0.50", "ms"]


def test_bench_p99_ratio_interval_holds_the_ratio_and_excludes_one_only_when_the_tails_differ() -> None:
    draw = random.Random(7)
    floor = [draw.expovariate(1) for _ in range(2000)]
    same = [draw.expovariate(1) for _ in range(2000)]
    slower = [2 * draw.expovariate(1) for _ in range(2000)]

    low, high = ratio_interval(same, floor, 0.99)
    assert low < percentile(same, 0.99) / percentile(floor, 0.99) < high
    assert low < 1.0 < high
    low, high = ratio_interval(slower, floor, 0.99)
    assert 1.3 < low < 2.0 < high < 3.0
    assert ratio_interval(slower, floor, 0.99) == (low, high)  # seeded: the same samples, the same interval


def test_bench_bare_server_answers_get_site_as_the_sites_service_does(
    stack: Stack, sites: pb_grpc.SiteServiceStub, token: Callable[..., str], tenant_pair: tuple[str, str]
) -> None:
    tenant, other = tenant_pair
    for owner in tenant_pair:
        create = pb.CreateSiteRequest(site_id=f"S-{owner}", request_id=f"bench-{owner}", site=pb.Site(name="Floor"))
        create.site.location.region = "nairobi-west"
        create.site.configuration.update({"equipment": [{"type": "rectifier"}]})
        sites.CreateSite(create, metadata=bearer(token(owner)), timeout=10)
    served = sites.GetSite(pb.GetSiteRequest(site_id=f"S-{tenant}"), metadata=bearer(token(tenant)), timeout=10)
    port = free_port()
    config = {"port": port, "dsn": stack.runtime_dsn("sites"), "tenant_id": tenant, "pool_min": 1, "pool_max": 2}
    with running("bare_server", config), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        bare = pb_grpc.SiteServiceStub(channel)
        assert bare.GetSite(pb.GetSiteRequest(site_id=f"S-{tenant}"), timeout=10) == served
        # Bound to its tenant like the service: the other tenant's row is not there (row-level security).
        with pytest.raises(grpc.RpcError) as refused:
            bare.GetSite(pb.GetSiteRequest(site_id=f"S-{other}"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND


def test_bench_flood_generator_stops_by_itself_and_counts_every_call(
    stack: Stack, features: Any, platform_token: str, token: Callable[..., str], new_tenant: Callable[..., str]
) -> None:
    flooder = new_tenant("flood")
    set_limit(features, platform_token, flooder, "rpm_read", 60)  # one a second, a burst admitted
    config: dict[str, Any] = {
        "target": f"127.0.0.1:{stack.config.ports['sites']}",
        "authority": "",
        "token": token(flooder),
        "rate": 40,
        "seconds": 1.0,
        "nice": 5,
    }
    report = _flood_report(config)
    # It ran at the lower priority asked for (the flooder's CPU is not the platform's) and says what it used.
    assert report["niceness"] == min(os.nice(0) + 5, 19), report
    assert report["rate"] == 40 and 0 < report["cpu_seconds"] < 30, report
    codes: dict[str, int] = report["codes"]
    assert report["sent"] == 40 and report["skipped"] == 0
    assert sum(codes.values()) == 40, codes
    # Refusals named by their ErrorInfo reason.
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED RATE_LIMITED"}, codes
    assert codes["OK"] >= 1 and codes["RESOURCE_EXHAUSTED RATE_LIMITED"] >= 1, codes
    # Closed loop: two callers as fast as answered, every call answered and counted.
    closed = _flood_report({**config, "rate": 0, "clients": 2, "seconds": 0.5})
    assert closed["sent"] > 2 and sum(closed["codes"].values()) == closed["sent"], closed
    assert set(closed["codes"]) <= {"OK", "RESOURCE_EXHAUSTED RATE_LIMITED"}, closed


def _flood_report(config: dict[str, Any]) -> dict[str, Any]:
    """Run the generator to its end; its report."""
    process = start("flood", config)
    try:
        assert process.stdout is not None
        report: dict[str, Any] = json.loads(process.stdout.readline())
        assert process.wait(timeout=15) == 0
    finally:
        stop(process)
    return report


def test_bench_envoy_cost_variants_are_configurations_envoy_accepts(tmp_path: Path) -> None:
    # Keys of its own: a fresh clone has no .data/keys until a stack has run.
    ensure_keys(tmp_path / "keys")
    settings = GatewaySettings.from_env({"DATA_DIR": str(tmp_path), "GATEWAY_WEB_DIR": "/none"})
    for name, variant in VARIANTS.items():
        path = tmp_path / f"{name}.json"
        document = variant(settings, "127.0.0.1:50052")
        path.write_text(json.dumps(document))
        assert "OK" in validate(path), name
    routers = {name: _http_filters(variant(settings, "127.0.0.1:50052")) for name, variant in VARIANTS.items()}
    # What sets the three apart: the router alone, then grpc_web too, then the whole chain.
    assert routers["minimal"] == ["envoy.filters.http.router"]
    assert routers["floor"] == ["envoy.filters.http.grpc_web", "envoy.filters.http.router"]
    assert len(routers["gateway"]) > 2 and routers["gateway"][-1] == "envoy.filters.http.router"


def _http_filters(document: dict[str, Any]) -> list[str]:
    manager = document["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return [f["name"] for f in manager["http_filters"]]
