"""What the bench runs against: the platform on free ports (``deploy.local.stack``), its gateway,
the bench's tenants with their sites, and the bare server; all stopped by the bench that started them.

Tenants, each with rate overrides so that each row measures what it names:
- ``bench_tenant``: read and write rates and calls in flight unlimited (the service without
  the limiter's work);
- ``bench_limited``: a finite read rate never reached (one rate decision per call);
- ``bench_quiet``: the other tenant of the isolation rows, a finite rate never reached;
- ``bench_flood``: ``rpm_read`` 600 (10 calls/s), the flooder.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from towerco.features.v1 import feature_gate_service_pb2 as features_pb
from towerco.features.v1 import feature_gate_service_pb2_grpc as features_grpc
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as pb_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2_grpc as tenant_grpc

from deploy.local import seed
from deploy.local.stack import Stack, StackConfig
from deploy.local.tokens import mint
from services.runtime.environment import process_environment
from services.runtime.settings import DB_POOL_MAX_SIZE, DB_POOL_MIN_SIZE, SERVICE_SETTINGS
from tests.support import free_port

from . import own_processes

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / "test-output"
SERVICES = ("tenant", "sites", "features", "audit")
SITES = 200
#: The site every GetSite of the bench reads.
SITE_ID = "B-0100"
#: A finite read rate no bench row reaches (calls per minute).
NEVER_REACHED = 10**9
FLOOD_RPM_READ = 600
RATES: dict[str, dict[str, int]] = {
    # Nor a bound on its calls in flight: 32 clients at a bound of 32 would meet it whenever a
    # client's next call arrives before the previous call's slot is given back.
    "bench_tenant": {"rpm_read": -1, "rpm_write": -1, "call_concurrency": -1},
    "bench_limited": {"rpm_read": NEVER_REACHED, "rpm_write": -1},
    "bench_quiet": {"rpm_read": NEVER_REACHED, "rpm_write": -1},
    "bench_flood": {"rpm_read": FLOOD_RPM_READ, "rpm_write": -1},
}


def workers_setting() -> str | None:
    """``SITES_WORKERS`` if this checkout's sites service has worker processes, else None."""
    return "SITES_WORKERS" if "SITES_WORKERS" in SERVICE_SETTINGS.names else None


@dataclass
class BenchStack:
    stack: Stack
    admin: str
    tokens: dict[str, str]
    gateway_port: int
    bare_port: int
    logs: dict[str, IO[bytes]] = field(default_factory=dict)

    def target(self, name: str) -> str:
        return f"127.0.0.1:{self.stack.config.ports[name]}"

    @property
    def sites(self) -> str:
        return self.target("sites")

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    @property
    def bare(self) -> str:
        return f"127.0.0.1:{self.bare_port}"

    @property
    def sites_dsn(self) -> str:
        return self.stack.runtime_dsn("sites")

    def metadata(self, tenant: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.tokens[tenant]}"),)

    def log(self, name: str) -> IO[bytes]:
        if name not in self.logs:
            self.logs[name] = (OUTPUT / f"bench-{name}.log").open("wb")
        return self.logs[name]


def pool_sizes() -> tuple[int, int]:
    """The sites service's pool, as its settings give it in this environment."""
    env = process_environment()
    maximum = DB_POOL_MAX_SIZE.read(env)
    return min(DB_POOL_MIN_SIZE.read(env), maximum), maximum


@contextmanager
def bench_stack() -> Iterator[BenchStack]:
    # A folder of this run's own: two benches at once (or a bench beside a test run) never share one.
    OUTPUT.mkdir(parents=True, exist_ok=True)
    data = Path(tempfile.mkdtemp(prefix="bench-data-", dir=OUTPUT))
    ports = {name: free_port() for name in SERVICES}
    config = StackConfig(
        data_dir=data,
        pg_port=free_port(),
        redis_port=free_port(),
        ports=ports,
        metrics_ports={name: free_port() for name in SERVICES},
    )
    config.gateway_port, config.gateway_admin_port = free_port(), free_port()
    stack = Stack(config)
    with ExitStack() as cleanup:
        bench = BenchStack(stack, "", {}, config.gateway_port, free_port())
        cleanup.callback(shutil.rmtree, data, True)
        cleanup.callback(lambda: [log.close() for log in bench.logs.values()])
        cleanup.callback(stack.stop_infra)
        stack.start_infra()
        cleanup.callback(stack.stop_services)
        stack.migrate(list(SERVICES))
        one_worker = {workers: "1"} if (workers := workers_setting()) else {}
        for name in SERVICES:
            extra = {"LOG_LEVEL": "WARNING", **(one_worker if name == "sites" else {})}
            stack.start_service(name, log=bench.log(name), extra_env=extra)
        for name in SERVICES:
            stack.wait_serving(name)
        bench.admin = mint(stack.keys_dir, role="platform_admin")
        bench.tokens = {tenant: mint(stack.keys_dir, tenant=tenant) for tenant in RATES}
        _provision(bench)
        stack.start_gateway(log=bench.log("gateway"), extra_env={"GATEWAY_WEB_DIR": "/none"})
        pool_min, pool_max = pool_sizes()
        bare = {"port": bench.bare_port, "dsn": bench.sites_dsn, "tenant_id": "bench_tenant"}
        cleanup.enter_context(
            own_processes.running(
                "bare_server", {**bare, "pool_min": pool_min, "pool_max": pool_max}, bench.log("bare")
            )
        )
        yield bench


def _provision(bench: BenchStack) -> None:
    admin_md = (("authorization", f"Bearer {bench.admin}"),)
    with grpc.insecure_channel(bench.target("tenant")) as channel:
        registry = tenant_grpc.TenantRegistryServiceStub(channel)
        for tenant in RATES:
            seed.provision(registry, bench.admin, tenant)
    with grpc.insecure_channel(bench.target("features")) as channel:
        gate = features_grpc.FeatureGateServiceStub(channel)
        for tenant, rates in RATES.items():
            for resource, limit in rates.items():
                request = features_pb.SetLimitOverrideRequest(tenant_id=tenant, resource=resource, limit=limit)
                gate.SetLimitOverride(request, metadata=admin_md)
    for tenant in RATES:
        create_sites(bench, bench.sites, tenant)


def create_sites(bench: BenchStack, target: str, tenant: str) -> None:
    """The tenant's bench sites, created through the sites service at ``target``."""
    count = SITES if tenant == "bench_tenant" else 20
    first = 0 if tenant == "bench_tenant" else 90
    with grpc.insecure_channel(target) as channel:
        sites = pb_grpc.SiteServiceStub(channel)
        for i in range(first, first + count):
            create = pb.CreateSiteRequest(
                site_id=f"B-{i:04d}", request_id=f"bench-{tenant}-{i}", site=pb.Site(name=f"Bench {i}")
            )
            sites.CreateSite(create, metadata=bench.metadata(tenant))
