"""``make bench``: latency and throughput of the sites service on a real local stack.

Starts embedded PostgreSQL and Redis and a sites process in a scratch folder, then
measures, through real gRPC with real JWTs:
- GetSite and ListSites latency (p50/p95/p99) with one client, sequential calls;
- throughput of 32 concurrent clients (asyncio) over the default pool;
- token verification cost, first sighting vs cached;
- the tenant registry: GetTenantSettings and public GetBranding (read through the cache),
  and how long a suspension takes to reach a sites process (pushed through Redis);
- the feature gate: GetEntitlements, one rate-limit decision in Redis (the Lua script),
  and how long a plan change takes to be enforced by a sites process;
- the tracing link (span and access line) per call: no SDK, sampled out (no OTLP endpoint),
  recorded, exported (``tests/bench/tracing_cost.py``);
- usage metering's counting per call, next to one dict increment (``tests/bench/usage_cost.py``);
- the gateway: GetSite through the real Envoy, as gRPC (HTTP/2) and as gRPC-web
  (HTTP/1.1, the way a browser calls), to set against GetSite straight to the service.

The bench tenant's read and write rates are set to unlimited (an override), so the
service numbers measure the service, not the limiter; the limiter is measured on its own.
"""

from __future__ import annotations

import asyncio
import http.client
import shutil
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc import aio
from towerco.features.v1 import feature_gate_service_pb2 as features_pb
from towerco.features.v1 import feature_gate_service_pb2_grpc as features_grpc
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as pb_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb
from towerco.tenant.v1 import tenant_registry_service_pb2_grpc as tenant_grpc

from deploy.local import seed
from deploy.local.stack import Stack, StackConfig
from deploy.local.tokens import mint
from services.runtime import metrics
from services.runtime.auth import TokenVerifier, VerifierConfig
from services.runtime.ratelimit import LimiterConfig, RateLimiter
from services.runtime.redis_clients import RedisConfig
from services.runtime.settings import DEFAULT_JWT_AUDIENCE, DEFAULT_JWT_ISSUER
from services.runtime.text_fields import TextFields
from tests.support import free_port

from .tracing_cost import bench_tracing
from .usage_cost import bench_usage

REPO = Path(__file__).resolve().parents[2]
SITES = 200


def _percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return f"p50 {pick(0.50):6.2f} ms  p95 {pick(0.95):6.2f} ms  p99 {pick(0.99):6.2f} ms  (n={len(samples)})"


def _time_sequential(name: str, call: Callable[[], object]) -> None:
    for _ in range(50):
        call()
    samples = []
    for _ in range(1000):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    print(f"{name:<18} sequential  {_percentiles(samples)}")


def bench_sequential(target: str, token: str) -> None:
    md = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.SiteServiceStub(channel)
        for i in range(SITES):
            stub.CreateSite(
                pb.CreateSiteRequest(site_id=f"B-{i:04d}", request_id=f"bench-{i}", site=pb.Site(name=f"Bench {i}")),
                metadata=md,
            )
        get = pb.GetSiteRequest(site_id="B-0100")
        _time_sequential("GetSite", lambda: stub.GetSite(get, metadata=md))
        page = pb.ListSitesRequest(page_size=50)
        _time_sequential("ListSites(50)", lambda: stub.ListSites(page, metadata=md))


async def bench_concurrent(target: str, token: str, clients: int = 32, seconds: float = 5.0) -> None:
    md = (("authorization", f"Bearer {token}"),)
    async with aio.insecure_channel(target) as channel:
        stub = pb_grpc.SiteServiceStub(channel)
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                await stub.GetSite(pb.GetSiteRequest(site_id="B-0100"), metadata=md)
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(client() for _ in range(clients)))
    print(f"GetSite x{clients:<6} concurrent  {len(latencies) / seconds:8.0f} calls/s  {_percentiles(latencies)}")


def bench_tokens(keys: Path) -> None:
    verifier = TokenVerifier(
        VerifierConfig(issuer=DEFAULT_JWT_ISSUER, audience=DEFAULT_JWT_AUDIENCE, jwks_file=str(keys / "jwks.json"))
    )
    tokens = [mint(keys, tenant="tenant_a", subject=f"user-{i}") for i in range(500)]
    start = time.perf_counter()
    for token in tokens:
        verifier.verify(token)
    first = (time.perf_counter() - start) / len(tokens)
    start = time.perf_counter()
    for _ in range(20):
        for token in tokens:
            verifier.verify(token)
    cached = (time.perf_counter() - start) / (20 * len(tokens))
    print(f"token verify    first {first * 1e6:8.1f} us   cached {cached * 1e6:6.2f} us")


def bench_request_text() -> None:
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
        print(f"request text    {name:<10} {(time.perf_counter() - start) / 20000 * 1e6:8.2f} us per request")


def bench_registry(target: str, sites_target: str, token: str, admin: str) -> None:
    md = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(target) as channel, grpc.insecure_channel(sites_target) as sites_channel:
        stub = tenant_grpc.TenantRegistryServiceStub(channel)
        get = tenant_pb.GetTenantSettingsRequest()
        _time_sequential("GetTenantSettings", lambda: stub.GetTenantSettings(get, metadata=md))
        branding = tenant_pb.GetBrandingRequest(host="bench_tenant.localhost")
        _time_sequential("GetBranding(host)", lambda: stub.GetBranding(branding))
        sites = pb_grpc.SiteServiceStub(sites_channel)
        delays = []
        for i in range(20):
            admin_md = (("authorization", f"Bearer {admin}"),)
            sites.ListSites(pb.ListSitesRequest(page_size=1), metadata=md)
            start = time.perf_counter()
            stub.SuspendTenant(
                tenant_pb.SuspendTenantRequest(tenant_id="bench_tenant", reason=f"bench {i}"), metadata=admin_md
            )
            while True:
                try:
                    sites.ListSites(pb.ListSitesRequest(page_size=1), metadata=md)
                except grpc.RpcError:
                    break
            delays.append(time.perf_counter() - start)
            stub.ReactivateTenant(tenant_pb.ReactivateTenantRequest(tenant_id="bench_tenant"), metadata=admin_md)
            while True:
                try:
                    sites.ListSites(pb.ListSitesRequest(page_size=1), metadata=md)
                    break
                except grpc.RpcError:
                    pass
        print(f"{'suspension seen':<15} by sites    {_percentiles(delays)}")


def bench_features(target: str, sites_target: str, token: str, admin: str) -> None:
    md = (("authorization", f"Bearer {token}"),)
    admin_md = (("authorization", f"Bearer {admin}"),)
    with grpc.insecure_channel(target) as channel, grpc.insecure_channel(sites_target) as sites_channel:
        gate = features_grpc.FeatureGateServiceStub(channel)
        get = features_pb.GetEntitlementsRequest()
        _time_sequential("GetEntitlements", lambda: gate.GetEntitlements(get, metadata=md))
        sites = pb_grpc.SiteServiceStub(sites_channel)
        analytics = pb.GetSiteAnalyticsRequest()
        _time_sequential("GetSiteAnalytics", lambda: sites.GetSiteAnalytics(analytics, metadata=md))
        delays = []
        for _ in range(20):
            for plan, refused in (("basic", True), ("enterprise", False)):
                start = time.perf_counter()
                gate.SetTenantPlan(
                    features_pb.SetTenantPlanRequest(tenant_id="bench_tenant", plan=plan), metadata=admin_md
                )
                while True:
                    try:
                        sites.GetSiteAnalytics(analytics, metadata=md)
                        if not refused:
                            break
                    except grpc.RpcError:
                        if refused:
                            break
                delays.append(time.perf_counter() - start)
        print(f"{'plan change seen':<15} by sites    {_percentiles(delays)}")
        # The same GetSite as above, now with a finite (never reached) rate: one Redis
        # decision per call, which is what every rate-limited tenant pays.
        limited = features_pb.SetLimitOverrideRequest(tenant_id="bench_tenant", resource="rpm_read", limit=10**9)
        gate.SetLimitOverride(limited, metadata=admin_md)
        time.sleep(0.2)
        get_site = pb.GetSiteRequest(site_id="B-0100")
        _time_sequential("GetSite (limited)", lambda: sites.GetSite(get_site, metadata=md))


async def bench_limiter(redis_url: str) -> None:
    limiter = RateLimiter(RedisConfig(redis_url, timeout_seconds=1.0), LimiterConfig())
    try:
        for _ in range(100):
            await limiter.decide("bench_limiter", "read", 1_000_000)
        samples = []
        for _ in range(2000):
            start = time.perf_counter()
            await limiter.decide("bench_limiter", "read", 1_000_000)
            samples.append(time.perf_counter() - start)
        print(f"{'rate decision':<18} in Redis     {_percentiles(samples)}")
    finally:
        await limiter.close()


def bench_gateway(port: int, token: str) -> None:
    """GetSite through Envoy: the cost of the edge (JWT check, tenant from the Host, proxying)."""
    md = (("authorization", f"Bearer {token}"),)
    get = pb.GetSiteRequest(site_id="B-0100")
    options = [("grpc.default_authority", "bench_tenant.localhost")]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = pb_grpc.SiteServiceStub(channel)
        _time_sequential("GetSite gateway", lambda: stub.GetSite(get, metadata=md))
    payload = get.SerializeToString()
    body = b"\x00" + len(payload).to_bytes(4, "big") + payload
    headers = {
        "Host": f"bench_tenant.localhost:{port}",
        "Content-Type": "application/grpc-web+proto",
        "X-Grpc-Web": "1",
        "Authorization": f"Bearer {token}",
    }
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def grpc_web() -> None:
        connection.request("POST", "/towerco.sites.v1.SiteService/GetSite", body, headers=headers)
        reply = connection.getresponse()
        data = reply.read()
        assert reply.status == 200 and b"grpc-status:0" in data, data

    try:
        _time_sequential("GetSite grpc-web", grpc_web)
    finally:
        connection.close()


def bench_metrics() -> None:
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
    print(f"metrics per call {per_call * 1e6:7.2f} us   floor (one counter inc) {floor * 1e6:5.2f} us   target < 30 us")

    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(10_000):
        tenant = f"bench_t{i:05d}"
        one_call(tenant)
        recorder.call(tenant, "write", method, "INVALID_ARGUMENT", 0.001)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    print(f"metrics memory   {grown / 2**20:7.1f} MiB for 10,000 tenants' series ({grown / 10_000:.0f} B per tenant)")


def main() -> None:
    data = REPO / "test-output" / "bench-data"
    shutil.rmtree(data, ignore_errors=True)
    ports = {"tenant": free_port(), "sites": free_port(), "features": free_port(), "audit": free_port()}
    metrics_ports = {"tenant": free_port(), "sites": free_port(), "features": free_port(), "audit": free_port()}
    config = StackConfig(
        data_dir=data, pg_port=free_port(), redis_port=free_port(), ports=ports, metrics_ports=metrics_ports
    )
    config.gateway_port, config.gateway_admin_port = free_port(), free_port()
    stack = Stack(config)
    services = ("tenant", "sites", "features", "audit")
    logs = [(REPO / "test-output" / f"bench-{name}.log").open("wb") for name in (*services, "gateway")]
    try:
        stack.start_infra()
        stack.migrate(list(services))
        for name, log in zip(services, logs, strict=False):
            stack.start_service(name, log=log, extra_env={"LOG_LEVEL": "WARNING"})
        for name in services:
            stack.wait_serving(name)
        admin = mint(stack.keys_dir, role="platform_admin")
        admin_md = (("authorization", f"Bearer {admin}"),)
        with grpc.insecure_channel(f"127.0.0.1:{ports['tenant']}") as channel:
            seed.provision(tenant_grpc.TenantRegistryServiceStub(channel), admin, "bench_tenant")
        with grpc.insecure_channel(f"127.0.0.1:{ports['features']}") as channel:
            gate = features_grpc.FeatureGateServiceStub(channel)
            for rate in ("rpm_read", "rpm_write"):
                request = features_pb.SetLimitOverrideRequest(tenant_id="bench_tenant", resource=rate, limit=-1)
                gate.SetLimitOverride(request, metadata=admin_md)
        target = f"127.0.0.1:{ports['sites']}"
        token = mint(stack.keys_dir, tenant="bench_tenant")
        bench_sequential(target, token)
        asyncio.run(bench_concurrent(target, token))
        bench_tokens(stack.keys_dir)
        bench_request_text()
        bench_metrics()
        bench_tracing()
        bench_usage()
        bench_registry(f"127.0.0.1:{ports['tenant']}", target, token, admin)
        bench_features(f"127.0.0.1:{ports['features']}", target, token, admin)
        asyncio.run(bench_limiter(stack.redis_url))
        gateway = stack.start_gateway(log=logs[-1], extra_env={"GATEWAY_WEB_DIR": "/none"})
        bench_gateway(gateway.port, token)
    finally:
        stack.stop_services()
        stack.stop_infra()
        for log in logs:
            log.close()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
