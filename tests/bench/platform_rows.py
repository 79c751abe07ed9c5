"""The platform's other rows: token verification, the request text check, metrics, tracing and usage
costs per call, the tenant registry, the feature gate and one rate decision of the limiter.

Run after the GetSite, throughput and isolation rows: the feature gate's row changes
``bench_tenant``'s plan back and forth (its rate overrides stay).
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import Callable

import grpc
from towerco.features.v1 import feature_gate_service_pb2 as features_pb
from towerco.features.v1 import feature_gate_service_pb2_grpc as features_grpc
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as pb_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb
from towerco.tenant.v1 import tenant_registry_service_pb2_grpc as tenant_grpc

from deploy.local.tokens import mint
from services.runtime import metrics
from services.runtime.auth import TokenVerifier, VerifierConfig
from services.runtime.ratelimit import LimiterConfig, RateLimiter
from services.runtime.redis_clients import RedisConfig
from services.runtime.settings import DEFAULT_JWT_AUDIENCE, DEFAULT_JWT_ISSUER
from services.runtime.text_fields import TextFields

from .bench_stack import BenchStack
from .results import Figure, Results, at_most
from .timing import ms, percentile, sample
from .tracing_cost import bench_tracing
from .usage_cost import TARGET_US, bench_usage


def _latency(results: Results, name: str, samples: list[float]) -> None:
    results.add(Figure(f"{name} p50", ms(percentile(samples, 0.5)), "ms"))
    results.add(Figure(f"{name} p99", ms(percentile(samples, 0.99)), "ms"))


def _until(call: Callable[[], object], fails: bool) -> None:
    """Call until it fails (``fails``) or succeeds."""
    while True:
        try:
            call()
            if not fails:
                return
        except grpc.RpcError:
            if fails:
                return


def bench_tokens(bench: BenchStack, results: Results) -> None:
    verifier = TokenVerifier(
        VerifierConfig(
            issuer=DEFAULT_JWT_ISSUER, audience=DEFAULT_JWT_AUDIENCE, jwks_file=str(bench.stack.keys_dir / "jwks.json")
        )
    )
    tokens = [mint(bench.stack.keys_dir, tenant="tenant_a", subject=f"user-{i}") for i in range(500)]
    start = time.perf_counter()
    for token in tokens:
        verifier.verify(token)
    first = (time.perf_counter() - start) / len(tokens)
    start = time.perf_counter()
    for _ in range(20):
        for token in tokens:
            verifier.verify(token)
    cached = (time.perf_counter() - start) / (20 * len(tokens))
    results.add(Figure("token verification, first sighting", first * 1e6, "us"))
    results.add(Figure("token verification, cached", cached * 1e6, "us"))


def bench_request_text(results: Results) -> None:
    """The request text link's check alone (no NUL anywhere, display fields clean), per request."""
    site = pb.CreateSiteRequest(site_id="site-001", request_id="9f1c2d3e-aaaa-bbbb-cccc-1234567890ab")
    site.site.name = "Nairobi West Tower 7"
    site.site.location.address = "Plot 12, Ngong Road\nNairobi"
    site.site.location.region, site.site.location.country_code = "nairobi-west", "KE"
    site.site.configuration.update(
        {
            "equipment": [{"type": "rectifier", "model": "R48-3000", "count": 4}, {"type": "battery"}],
            "thresholds": {"battery_voltage_min": 46.0, "temp_max": 55},
            "notes": "shared with operator B",
        }
    )
    checks = [
        ("CreateSite", TextFields.of(pb.CreateSiteRequest.DESCRIPTOR), site),
        ("GetSite", TextFields.of(pb.GetSiteRequest.DESCRIPTOR), pb.GetSiteRequest(site_id="site-001")),
    ]
    for name, fields, request in checks:
        assert not fields.violations(request)
        start = time.perf_counter()
        for _ in range(20000):
            fields.violations(request)
        results.add(Figure(f"request text check, {name}", (time.perf_counter() - start) / 20000 * 1e6, "us"))


def bench_metrics(results: Results) -> None:
    """The metrics work of one call (the link's recording, its tenant, two cache look-ups, the
    database time), next to its floor (one counter increment); then 10,000 tenants' series."""
    recorder = metrics.ServiceMetrics("bench", tenant_label_cap=20_000)
    method = "/towerco.sites.v1.SiteService/GetSite"
    floor_counter = metrics.TENANT_CALLS.labels("bench_floor", "bench", "read", "ok")

    def one_call(tenant: str) -> None:
        with metrics.recording() as record:
            record.tenant_id = tenant
            recorder.cache_lookup(hit=True)
            recorder.cache_lookup(hit=True)
            recorder.db_time(tenant, 0.0004)
        recorder.call(record.tenant_id, "read", method, "OK", 0.0021)

    rounds = 50_000
    for _ in range(1000):
        one_call("bench_tenant")
    start = time.perf_counter()
    for _ in range(rounds):
        one_call("bench_tenant")
    per_call = (time.perf_counter() - start) / rounds
    start = time.perf_counter()
    for _ in range(rounds):
        floor_counter.inc()
    floor = (time.perf_counter() - start) / rounds
    results.add(Figure("metrics per call", per_call * 1e6, "us", floor * 1e6, "one counter inc", at_most(30)))

    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(10_000):
        tenant = f"bench_t{i:05d}"
        one_call(tenant)
        recorder.call(tenant, "write", method, "INVALID_ARGUMENT", 0.001)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    results.add(
        Figure(
            "metrics memory, 10,000 tenants' series", grown / 2**20, "MiB", note=f"{grown / 10_000:.0f} B per tenant"
        )
    )


def bench_link_costs(results: Results) -> None:
    for mode, cost in bench_tracing().items():
        results.add(Figure(f"tracing link, {mode}", cost, "us"))
    counted, floor = bench_usage()
    results.add(Figure("usage metering per call", counted, "us", floor, "one dict increment", at_most(TARGET_US)))


def bench_registry(bench: BenchStack, results: Results, samples: int) -> None:
    md = bench.metadata("bench_tenant")
    admin_md = (("authorization", f"Bearer {bench.admin}"),)
    with grpc.insecure_channel(bench.target("tenant")) as channel, grpc.insecure_channel(bench.sites) as sites_channel:
        stub = tenant_grpc.TenantRegistryServiceStub(channel)
        get = tenant_pb.GetTenantSettingsRequest()
        _latency(results, "GetTenantSettings", sample(lambda: stub.GetTenantSettings(get, metadata=md), samples))
        branding = tenant_pb.GetBrandingRequest(host="bench_tenant.localhost")
        _latency(results, "GetBranding(host)", sample(lambda: stub.GetBranding(branding), samples))
        sites = pb_grpc.SiteServiceStub(sites_channel)
        listing = lambda: sites.ListSites(pb.ListSitesRequest(page_size=1), metadata=md)  # noqa: E731
        delays = []
        for i in range(20):
            listing()
            start = time.perf_counter()
            suspend = tenant_pb.SuspendTenantRequest(tenant_id="bench_tenant", reason=f"bench {i}")
            stub.SuspendTenant(suspend, metadata=admin_md)
            _until(listing, fails=True)
            delays.append(time.perf_counter() - start)
            stub.ReactivateTenant(tenant_pb.ReactivateTenantRequest(tenant_id="bench_tenant"), metadata=admin_md)
            _until(listing, fails=False)
        _latency(results, "a suspension seen by sites", delays)


def bench_features(bench: BenchStack, results: Results, samples: int) -> None:
    md = bench.metadata("bench_tenant")
    admin_md = (("authorization", f"Bearer {bench.admin}"),)
    with (
        grpc.insecure_channel(bench.target("features")) as channel,
        grpc.insecure_channel(bench.sites) as sites_channel,
    ):
        gate = features_grpc.FeatureGateServiceStub(channel)
        get = features_pb.GetEntitlementsRequest()
        _latency(results, "GetEntitlements", sample(lambda: gate.GetEntitlements(get, metadata=md), samples))
        sites = pb_grpc.SiteServiceStub(sites_channel)
        analytics = pb.GetSiteAnalyticsRequest()
        call = lambda: sites.GetSiteAnalytics(analytics, metadata=md)  # noqa: E731
        _latency(results, "GetSiteAnalytics", sample(call, samples))
        delays = []
        for _ in range(20):
            for plan, refused in (("basic", True), ("enterprise", False)):
                start = time.perf_counter()
                change = features_pb.SetTenantPlanRequest(tenant_id="bench_tenant", plan=plan)
                gate.SetTenantPlan(change, metadata=admin_md)
                _until(call, fails=refused)
                delays.append(time.perf_counter() - start)
        _latency(results, "a plan change enforced by sites", delays)


async def _limiter(redis_url: str, samples: int) -> list[float]:
    limiter = RateLimiter(RedisConfig(redis_url, timeout_seconds=1.0), LimiterConfig())
    try:
        for _ in range(100):
            await limiter.decide("bench_limiter", "read", 1_000_000)
        taken = []
        for _ in range(samples):
            start = time.perf_counter()
            await limiter.decide("bench_limiter", "read", 1_000_000)
            taken.append(time.perf_counter() - start)
        return taken
    finally:
        await limiter.close()


def bench_limiter(bench: BenchStack, results: Results, samples: int) -> None:
    _latency(results, "one rate decision (RateLimiter.decide)", asyncio.run(_limiter(bench.stack.redis_url, samples)))


def bench_platform(bench: BenchStack, results: Results, samples: int) -> None:
    results.section("The platform's other rows")
    bench_tokens(bench, results)
    bench_request_text(results)
    bench_metrics(results)
    bench_link_costs(results)
    bench_registry(bench, results, samples)
    bench_features(bench, results, samples)
    bench_limiter(bench, results, samples)
