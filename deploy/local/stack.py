"""The whole platform on one machine: what ``make run`` and the test suite start.

PostgreSQL and Redis are real servers: the embedded ones under ``.data/`` unless
``DATABASE_URL`` / ``REDIS_URL`` name others. Each service runs as its own process
(``python -m services.<name>``), exactly as in a deployment.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import domains
from gateway.config import GATEWAY_ADMIN_PORT, GATEWAY_PORT, GATEWAY_ROUTES_DIR, GatewaySettings, routes_template
from gateway.envoy import write_config
from services.runtime.cells import CELL_DATABASE_URLS, CELLS, Cell
from services.runtime.environment import SettingsTable, integer, process_environment, text
from services.runtime.server import ServiceSpec, migrate_service
from services.runtime.settings import (
    AUDIT_RETENTION_CELL_DATABASE_URLS,
    AUDIT_RETENTION_DATABASE_URL,
    DATA_DIR,
    DATABASE_URLS,
    DEFAULT_METRICS_PORTS,
    DEFAULT_PORTS,
    GATEWAY_SECRET,
    JWT_AUDIENCE,
    JWT_ISSUER,
    METRICS_PORTS,
    PORTS,
    REDIS_URL,
    SERVICE_JWT_ISSUER,
    TENANT_MOVER_DATABASE_URLS,
    WORKERS,
    gateway_secret,
)
from services.runtime.tls import GrpcTls

from . import postgres, redis_server
from .dsn import DEV_APP_DB_PASSWORD, runtime_dsn
from .gateway import GATEWAY_WORKERS, start_envoy, wait_ready
from .postgres import start_postgres, stop_postgres
from .prometheus import PROMETHEUS_PORT, render_config, start_prometheus
from .prometheus import wait_ready as wait_prometheus_ready
from .redis_server import start_redis, stop_redis
from .supervisor import Supervised
from .tokens import ensure_keys

REPO = Path(__file__).resolve().parents[2]
#: Start order: the registry first, since the others will ask it about tenants.
SERVICE_ORDER = ("tenant", "sites", "features", "audit")
DATABASE = "towerco"


def available_services() -> list[str]:
    """The services that exist in this checkout (those with a ``__main__``)."""
    return [name for name in SERVICE_ORDER if (REPO / "services" / name / "__main__.py").exists()]


def service_spec(name: str) -> ServiceSpec:
    spec = importlib.import_module(f"services.{name}.__main__").SPEC
    assert isinstance(spec, ServiceSpec)
    return spec


PG_PORT = integer("PG_PORT", 55432, "ports of the embedded PostgreSQL and Redis")
REDIS_PORT = integer("REDIS_PORT", 56379, PG_PORT.doc)
DATABASE_URL = text(
    "DATABASE_URL",
    "",
    "a PostgreSQL server of your own for `make run` and the tests: an owner's (administrative) DSN. The dev stack "
    "migrates with it and hands each service `<SERVICE>_DATABASE_URL`, the same server as `<service>_app` with "
    "`APP_DB_PASSWORD`. Services never read it",
    shown="none: the embedded server (database `towerco`)",
)
APP_DB_PASSWORD = text(
    "APP_DB_PASSWORD",
    DEV_APP_DB_PASSWORD,
    "the password the dev stack gives the runtime roles and puts in the services' `<SERVICE>_DATABASE_URL` "
    "(the embedded server trusts loopback)",
)

#: What ``make run``, ``make token`` and the test suite's stack read (the services and the
#: gateway they start read their own tables).
DEV_STACK_SETTINGS = SettingsTable.of(
    "dev stack",
    DATA_DIR,
    DATABASE_URL,
    REDIS_URL,
    PG_PORT,
    REDIS_PORT,
    CELLS,
    PORTS.values(),
    WORKERS.values(),
    METRICS_PORTS.values(),
    GATEWAY_PORT,
    GATEWAY_ADMIN_PORT,
    GATEWAY_WORKERS,
    PROMETHEUS_PORT,
    APP_DB_PASSWORD,
    GATEWAY_SECRET,
    JWT_ISSUER,
    JWT_AUDIENCE,
    SERVICE_JWT_ISSUER,
)


@dataclass
class StackConfig:
    data_dir: Path
    pg_port: int = PG_PORT.default
    redis_port: int = REDIS_PORT.default
    #: Given servers; None starts the embedded ones.
    database_url: str | None = None
    redis_url: str | None = None
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    #: Each service's Prometheus ``/metrics`` port (what a Prometheus of the stack scrapes).
    metrics_ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_METRICS_PORTS))
    #: The gateway's listener and its (loopback) admin interface.
    gateway_port: int = GATEWAY_PORT.default
    gateway_admin_port: int = GATEWAY_ADMIN_PORT.default
    #: Envoy's worker threads (``GATEWAY_WORKERS``): every core, here and in the test stacks, so
    #: that the gateway the tests and the bench meet is the one ``make run`` starts.
    gateway_workers: int = field(default_factory=lambda: machine_cores())
    #: Where Prometheus listens, when it is started (``make run``: if the binary is there).
    prometheus_port: int = PROMETHEUS_PORT.default
    #: Trade durability for speed (tests only): fsync off.
    fast: bool = False
    #: Extra environment for the service processes.
    env: dict[str, str] = field(default_factory=dict)
    #: Worker processes of each service named (``<SERVICE>_WORKERS``); the others keep their own default (1).
    workers: dict[str, int] = field(default_factory=dict)
    #: The database cells (``CELLS``): each after the first is an embedded PostgreSQL of its own.
    cells: tuple[Cell, ...] = CELLS.default
    #: Their ports, by name; a cell not named here listens on ``pg_port`` plus its place in ``cells``.
    cell_pg_ports: dict[str, int] = field(default_factory=dict)

    def cell_pg_port(self, cell: str) -> int:
        return self.cell_pg_ports.get(cell) or self.pg_port + [c.name for c in self.cells].index(cell)

    @classmethod
    def from_env(cls, data_dir: Path, environ: Mapping[str, str] | None = None) -> StackConfig:
        """The dev stack's settings from ``environ`` (the process environment by default)."""
        env = process_environment() if environ is None else environ
        return cls(
            data_dir=data_dir,
            pg_port=PG_PORT.read(env),
            redis_port=REDIS_PORT.read(env),
            database_url=DATABASE_URL.read(env) or None,
            redis_url=REDIS_URL.read(env) if REDIS_URL.is_set(env) else None,
            ports={name: setting.read(env) for name, setting in PORTS.items()},
            metrics_ports={name: setting.read(env) for name, setting in METRICS_PORTS.items()},
            gateway_port=GATEWAY_PORT.read(env),
            gateway_admin_port=GATEWAY_ADMIN_PORT.read(env),
            gateway_workers=GATEWAY_WORKERS.read(env) if GATEWAY_WORKERS.is_set(env) else machine_cores(),
            prometheus_port=PROMETHEUS_PORT.read(env),
            cells=CELLS.read(env),
            # Every core serves: each service as many workers as the machine has, unless told.
            workers={
                name: setting.read(env) if setting.is_set(env) else machine_cores() for name, setting in WORKERS.items()
            },
        )


class Stack:
    """Start, migrate, serve and stop the platform."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.database_url = config.database_url or ""
        self.redis_url = config.redis_url or ""
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._tls: dict[str, GrpcTls] = {}
        self._embedded_pg = config.database_url is None
        self._embedded_redis = config.redis_url is None
        #: Each cell's owner DSN but the home one's (``database_url``).
        self.cell_urls: dict[str, str] = {}
        if len(config.cells) > 1 and not self._embedded_pg:
            raise ValueError("more than one cell (CELLS) needs the embedded PostgreSQL servers: unset DATABASE_URL")

    @property
    def keys_dir(self) -> Path:
        return self.config.data_dir / "keys"

    def start_infra(self) -> None:
        ensure_keys(self.keys_dir)
        if self._embedded_pg:
            self._start_embedded_postgres()
            for cell in self.other_cells:
                self.start_cell(cell)
        if self._embedded_redis:
            self._start_embedded_redis()

    @property
    def other_cells(self) -> list[str]:
        """The cells but the home one, each an embedded PostgreSQL of its own."""
        return [cell.name for cell in self.config.cells[1:]]

    def _cell_dir(self, cell: str) -> Path:
        return self.config.data_dir / f"pg-{cell}"

    def start_cell(self, cell: str) -> str:
        """Start (or start again) the embedded PostgreSQL of ``cell``, not the home one."""
        pg = start_postgres(self._cell_dir(cell), self.config.cell_pg_port(cell), fast=self.config.fast)
        asyncio.run(_ensure_database(pg.superuser_dsn(), DATABASE))
        self.cell_urls[cell] = pg.superuser_dsn(DATABASE)
        return f"pid {postgres.running_pid(pg.data_dir)}, {pg.host}:{pg.port}"

    def stop_cell(self, cell: str) -> None:
        """Stop the embedded PostgreSQL of ``cell`` (its tenants' calls become UNAVAILABLE)."""
        stop_postgres(self._cell_dir(cell))

    def cell_runtime_dsn(self, cell: str, service: str) -> str:
        """``service``'s runtime DSN on ``cell`` (the home cell: :meth:`runtime_dsn`)."""
        url = self.cell_urls.get(cell, self.database_url)
        return runtime_dsn(url, service, self.app_db_password)

    def _start_embedded_postgres(self) -> str:
        pg = start_postgres(self.config.data_dir / "pg", self.config.pg_port, fast=self.config.fast)
        asyncio.run(_ensure_database(pg.superuser_dsn(), DATABASE))
        self.database_url = pg.superuser_dsn(DATABASE)
        return f"pid {postgres.running_pid(pg.data_dir)}, {pg.host}:{pg.port}"

    def _start_embedded_redis(self) -> str:
        server = start_redis(self.config.data_dir / "redis", self.config.redis_port)
        self.redis_url = server.url
        return f"pid {redis_server.running_pid(server.data_dir)}, {server.url}"

    @property
    def app_db_password(self) -> str:
        """The runtime roles' password in this stack (``APP_DB_PASSWORD``, else the dev one)."""
        return APP_DB_PASSWORD.read(process_environment())

    def runtime_dsn(self, service: str) -> str:
        """The DSN the stack gives ``service``: its database as the runtime role ``<service>_app``."""
        return runtime_dsn(self.database_url, service, self.app_db_password)

    def migrate(self, names: list[str] | None = None) -> dict[str, list[int]]:
        """Migrate with the owner's DSN (``DATABASE_URL`` or the embedded server's): services never hold it."""

        async def run() -> dict[str, list[int]]:
            done = {}
            for name in names or available_services():
                spec = service_spec(name)
                done[name] = await migrate_service(spec, self.database_url, self.app_db_password)
                # Every cell holds every service's schemas, roles and policies (the registry's stays empty).
                for url in self.cell_urls.values():
                    await migrate_service(spec, url, self.app_db_password)
            return done

        return asyncio.run(run())

    def start_platform(self, logs: Mapping[str, IO[bytes] | None]) -> None:
        """Servers, migrations, then each service ``logs`` names (its output there; None: this process's),
        until every one is SERVING: what ``make run`` and the test stacks start with."""
        self.start_infra()
        self.migrate()
        for name, log in logs.items():
            self.start_service(name, log=log)
        for name in logs:
            self.wait_serving(name)

    def service_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        # The services inherit this process's environment, overridden by the stack's own.
        env = dict(process_environment())
        env.update(
            {
                "REDIS_URL": self.redis_url,
                "DATA_DIR": str(self.config.data_dir),
                "PYTHONUNBUFFERED": "1",
            }
        )
        # Each service's runtime DSN, named explicitly as a deployment names it.
        env.update({setting.name: self.runtime_dsn(name) for name, setting in DATABASE_URLS.items()})
        # The audit service's retention job deletes as audit_retention, which the dev stack's
        # administrator may SET ROLE to; only the audit process reads it.
        env[AUDIT_RETENTION_DATABASE_URL.name] = self.database_url
        if len(self.config.cells) > 1:
            env[CELLS.name] = ",".join(f"{c.name}:dedicated" if c.dedicated else c.name for c in self.config.cells)
            for name, setting in CELL_DATABASE_URLS.items():
                env[setting.name] = " ".join(f"{cell}={self.cell_runtime_dsn(cell, name)}" for cell in self.other_cells)
            env[AUDIT_RETENTION_CELL_DATABASE_URLS.name] = " ".join(f"{c}={url}" for c, url in self.cell_urls.items())
            # MoveTenant's copies, as the dev stack's administrator of each cell, the home cell's too.
            movers = {self.config.cells[0].name: self.database_url, **self.cell_urls}
            env[TENANT_MOVER_DATABASE_URLS.name] = " ".join(f"{c}={url}" for c, url in movers.items())
        # Not the dev stack's own variables: a service must not lean on them.
        for name in ("DATABASE_URL", "APP_DB_PASSWORD"):
            env.pop(name, None)
        env.update({f"{name.upper()}_PORT": str(port) for name, port in self.config.ports.items()})
        env.update({f"{name.upper()}_METRICS_PORT": str(port) for name, port in self.config.metrics_ports.items()})
        env.update(
            {"GATEWAY_PORT": str(self.config.gateway_port), "GATEWAY_ADMIN_PORT": str(self.config.gateway_admin_port)}
        )
        env.update({WORKERS[name].name: str(count) for name, count in self.config.workers.items()})
        env.update(self.config.env)
        env.update(extra or {})
        return env

    def start_service(
        self,
        name: str,
        *,
        log: IO[bytes] | None = None,
        extra_env: Mapping[str, str] | None = None,
        instance: str | None = None,
        workers: int | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``python -m services.<name>``; ``instance`` names a second copy of a service.

        A second copy serves no ``/metrics`` unless ``extra_env`` gives it a port: the first
        holds the stack's. ``workers``: its ``<SERVICE>_WORKERS`` (default: the stack's).
        """
        metrics = {METRICS_PORTS[name].name: "0"} if instance not in (None, name) else {}
        count = {} if workers is None else {WORKERS[name].name: str(workers)}
        env = self.service_env({**metrics, **count, **(extra_env or {})})
        # wait_serving asks it as its callers will: over TLS if it serves TLS.
        self._tls[instance or name] = GrpcTls.from_env(env)
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", f"services.{name}"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT if log is not None else None,
        )
        self.processes[instance or name] = process
        return process

    def wait_serving(
        self, name: str, port: int | None = None, timeout: float = 60.0, instance: str | None = None
    ) -> None:
        """Block until the service's gRPC health check says SERVING."""
        port = port or self.config.ports[name]
        process = self.processes.get(instance or name)
        deadline = time.monotonic() + timeout
        tls = self._tls.get(instance or name) or GrpcTls.from_env(self.service_env())
        with tls.channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if process is not None and process.poll() is not None:
                    raise RuntimeError(f"service {name} exited with code {process.returncode} while starting")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"service {name} was not SERVING on port {port} within {timeout:.0f}s")

    def gateway_settings(self, extra_env: Mapping[str, str] | None = None) -> GatewaySettings:
        return GatewaySettings.from_env(self.service_env(extra_env))

    def start_gateway(
        self,
        *,
        log: IO[bytes] | None = None,
        extra_env: Mapping[str, str] | None = None,
        instance: str = "gateway",
        wait: bool = True,
        workers: int | None = None,
    ) -> GatewaySettings:
        """Render the gateway's configuration for this stack, start Envoy on it and (if ``wait``) wait until ready.

        ``workers``: Envoy's worker threads (default: the stack's ``gateway_workers``).

        Its routes are a file in ``<instance>/routes`` (unless ``extra_env`` says otherwise)
        that ``python -m gateway domains`` (``<instance>-domains``, started first) keeps in
        step with the tenants' custom domains."""
        extra_env = self._gateway_env(instance, extra_env)
        settings = self.gateway_settings(extra_env)
        config = write_config(settings, self.config.data_dir / instance / "envoy.json")
        env = self.service_env(extra_env)
        if settings.routes_dir:
            self.start_domain_sync(settings, env, log, instance)
        env["GATEWAY_SECRET"] = gateway_secret(self.keys_dir, env).decode()
        process = start_envoy(config, log, workers or self.config.gateway_workers, env=env)
        self.processes[instance] = process
        if wait:
            wait_ready(process, settings)
        return settings

    def _gateway_env(self, instance: str, extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
        return {GATEWAY_ROUTES_DIR.name: str(self.config.data_dir / instance / "routes"), **(extra_env or {})}

    def start_domain_sync(
        self, settings: GatewaySettings, env: Mapping[str, str], log: IO[bytes] | None, instance: str = "gateway"
    ) -> subprocess.Popen[bytes]:
        """``python -m gateway domains`` for the gateway ``instance`` (``<instance>-domains``),
        replacing one still running; the routes file exists (without custom domains) before it returns."""
        name = f"{instance}-domains"
        if name in self.processes:
            self.stop(name)
        template = self.config.data_dir / instance / "routes-template.json"
        template.write_text(routes_template(settings).to_json())
        routes = Path(settings.routes_dir)
        if not (routes / domains.ROUTES_FILE).is_file():
            domains.write_routes(routes, domains.RoutesTemplate.read(template), {})
        command = ["--template", str(template), "--routes-dir", str(routes)]
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "gateway", "domains", *command],
            cwd=REPO,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT if log is not None else None,
        )
        self.processes[name] = process
        return process

    def start_prometheus(
        self, *, port: int | None = None, scrape_interval: str = "5s", instance: str = "prometheus", wait: bool = True
    ) -> str:
        """Prometheus scraping this stack's services and gateway, with the platform's rules; its URL.

        It listens on ``port`` (default: the stack's ``prometheus_port``); its configuration,
        database and log go under ``<data_dir>/<instance>/``. PrometheusError when the binary
        is not on PATH (see :func:`~deploy.local.prometheus.prometheus_binary`).
        """
        folder = self.config.data_dir / instance
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "prometheus.yml"
        config.write_text(render_config(self.config.metrics_ports, self.config.gateway_admin_port, scrape_interval))
        port = port or self.config.prometheus_port
        log_path = folder / "prometheus.log"
        with log_path.open("ab") as log:
            process = start_prometheus(config, folder / "data", port, log)
        self.processes[instance] = process
        if wait:
            wait_prometheus_ready(process, port, log_path)
        return f"http://127.0.0.1:{port}"

    def stop(self, instance: str, timeout: float = 15.0) -> None:
        """Stop one process this stack started (a service instance, or the gateway and its domain sync)."""
        stop_process(self.processes.pop(instance), timeout)
        if f"{instance}-domains" in self.processes:
            stop_process(self.processes.pop(f"{instance}-domains"), timeout)

    def stop_services(self, timeout: float = 15.0) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()

    def supervised(self, services: list[str], gateway_log: Path) -> list[Supervised]:
        """What ``make run`` keeps running, servers first: how to tell each is gone and start it again."""
        watched = []
        if self._embedded_pg:
            pg_check = _server_check(postgres.running_pid, self.config.data_dir / "pg")
            watched.append(Supervised("PostgreSQL", pg_check, self._start_embedded_postgres))
            for cell in self.other_cells:
                cell_check = _server_check(postgres.running_pid, self._cell_dir(cell))
                watched.append(Supervised(f"PostgreSQL {cell}", cell_check, self._cell_starter(cell)))
        if self._embedded_redis:
            redis_check = _server_check(redis_server.running_pid, self.config.data_dir / "redis")
            watched.append(Supervised("Redis", redis_check, self._start_embedded_redis))

        def restart_gateway() -> str:
            with gateway_log.open("ab") as log:
                # Not waiting for healthy clusters: a service that is down too is restarted meanwhile.
                self.start_gateway(log=log, wait=False)
            return f"pid {self.processes['gateway'].pid}"

        def restart_domain_sync() -> str:
            env = self._gateway_env("gateway")
            with gateway_log.open("ab") as log:
                process = self.start_domain_sync(self.gateway_settings(env), self.service_env(env), log)
            return f"pid {process.pid}"

        servers = tuple(server.name for server in watched)
        for name in services:
            watched.append(Supervised(name, self._exit_check(name), self._restarter(name), needs=servers))
        watched.append(Supervised("gateway", self._exit_check("gateway"), restart_gateway))
        if "gateway-domains" in self.processes:
            watched.append(Supervised("gateway domains", self._exit_check("gateway-domains"), restart_domain_sync))
        if "prometheus" in self.processes:  # started only when the binary is there

            def restart_prometheus() -> str:
                self.start_prometheus(wait=False)
                return f"pid {self.processes['prometheus'].pid}"

            watched.append(Supervised("Prometheus", self._exit_check("prometheus"), restart_prometheus))
        return watched

    def _exit_check(self, instance: str) -> Callable[[], str | None]:
        def check() -> str | None:
            code = self.processes[instance].poll()
            return None if code is None else f"exited with code {code}"

        return check

    def _cell_starter(self, cell: str) -> Callable[[], str]:
        return lambda: self.start_cell(cell)

    def _restarter(self, name: str) -> Callable[[], str]:
        def restart() -> str:
            return f"pid {self.start_service(name).pid}"

        return restart

    def stop_infra(self) -> None:
        if self._embedded_redis:
            stop_redis(self.config.data_dir / "redis")
        if self._embedded_pg:
            for cell in self.other_cells:
                self.stop_cell(cell)
            stop_postgres(self.config.data_dir / "pg")


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def stop_process(process: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """SIGTERM ``process`` if it still runs and wait up to ``timeout`` for it to drain, then SIGKILL it."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _server_check(running_pid: Callable[[Path], int | None], data_dir: Path) -> Callable[[], str | None]:
    """A daemon's check: its pid file in ``data_dir`` names a live server of that directory."""
    return lambda: "is not running" if running_pid(data_dir) is None else None


async def _ensure_database(superuser_dsn: str, name: str) -> None:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(superuser_dsn)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
