"""Health that tells the truth: alive is not ready.

A sites process of the module's own runs on a PostgreSQL server of the module's own, which
the tests stop and start again (the session's database is never touched), behind a gateway
of the module's own. While the database is away the process stays SERVING under ``""``
(liveness: restarting it would mend nothing) and its gRPC service names turn NOT_SERVING
(readiness), so the gateway's health checks take it out; they turn SERVING again when the
database is back. The gateway answers its own HTTP health path for the load balancer.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from deploy.local.dsn import runtime_dsn
from deploy.local.postgres import start_postgres, stop_postgres
from deploy.local.stack import Stack, service_spec
from gateway.config import HEALTH_PATH, GatewaySettings
from services.runtime.health import DatabaseProbe, HealthState
from services.runtime.server import migrate_service

from .conftest import OUTPUT
from .support import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SITES_NAMES = [d.full_name for d in service_spec("sites").services]


@dataclass
class Setup:
    """The module's PostgreSQL, the sites process on it, and a gateway in front of it."""

    pg_dir: Path
    pg_port: int
    target: str
    gateway: GatewaySettings

    def stop_database(self) -> None:
        stop_postgres(self.pg_dir)

    def start_database(self) -> None:
        start_postgres(self.pg_dir, self.pg_port, fast=True)


@pytest.fixture(scope="module")
def setup(stack: Stack) -> Iterator[Setup]:
    folder = OUTPUT / f".health-pg-{uuid.uuid4().hex[:8]}"
    pg_dir, pg_port = folder / "pg", free_port()
    port = free_port()
    sites, gateway = f"sites-health-{port}", f"gateway-health-{port}"
    try:
        owner = start_postgres(pg_dir, pg_port, fast=True).superuser_dsn()
        asyncio.run(migrate_service(service_spec("sites"), owner, stack.app_db_password))
        with (folder / "sites.log").open("ab") as log:
            stack.start_service(
                "sites",
                instance=sites,
                log=log,
                extra_env={
                    "SITES_PORT": str(port),
                    "SITES_DATABASE_URL": runtime_dsn(owner, "sites", stack.app_db_password),
                },
            )
        stack.wait_serving("sites", port=port, instance=sites)
        env = {
            "GATEWAY_PORT": str(free_port()),
            "GATEWAY_ADMIN_PORT": str(free_port()),
            "SITES_TARGET": f"127.0.0.1:{port}",
            "GATEWAY_WEB_DIR": "/none",
        }
        with (folder / "envoy.log").open("ab") as log:
            settings = stack.start_gateway(log=log, extra_env=env, instance=gateway)
        yield Setup(pg_dir, pg_port, f"127.0.0.1:{port}", settings)
    finally:
        for instance in (gateway, sites):
            if instance in stack.processes:
                stack.stop(instance)
        stop_postgres(pg_dir)
        shutil.rmtree(folder, ignore_errors=True)


def health(target: str, name: str) -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name), timeout=2)
    return int(reply.status)


def statuses(target: str) -> dict[str, int]:
    return {name: health(target, name) for name in ["", *SITES_NAMES]}


def gateway_sees(settings: GatewaySettings, target: str) -> bool:
    """Whether the gateway's active health check passes the sites host at ``target``."""
    url = f"http://127.0.0.1:{settings.admin_port}/clusters?format=json"
    with urllib.request.urlopen(url, timeout=2) as reply:
        clusters = json.loads(reply.read())["cluster_statuses"]
    (sites,) = [c for c in clusters if c["name"] == "sites"]
    (host,) = [
        h
        for h in sites["host_statuses"]
        if f"{h['address']['socket_address']['address']}:{h['address']['socket_address']['port_value']}" == target
    ]
    return not host.get("health_status", {}).get("failed_active_health_check", False)


def http_status(url: str) -> int:
    request = urllib.request.Request(url, method="POST" if "/healthcheck/" in url else "GET")
    try:
        with urllib.request.urlopen(request, timeout=2) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_without_its_database_a_service_is_alive_but_not_ready_and_ready_again_when_it_returns(
    setup: Setup, eventually: Callable[..., Any]
) -> None:
    ready = {"": SERVING, **{name: SERVING for name in SITES_NAMES}}
    assert statuses(setup.target) == ready
    setup.stop_database()
    try:
        alive_not_ready = {"": SERVING, **{name: NOT_SERVING for name in SITES_NAMES}}

        def not_ready() -> None:
            assert statuses(setup.target) == alive_not_ready

        eventually(not_ready, within=5)
    finally:
        setup.start_database()

    def serving_again() -> None:
        assert statuses(setup.target) == ready

    eventually(serving_again, within=10)


def test_the_gateway_takes_a_host_out_while_its_database_is_away_and_back_after(
    setup: Setup, eventually: Callable[..., Any]
) -> None:
    def back() -> None:
        assert gateway_sees(setup.gateway, setup.target)

    eventually(back, within=10)  # it may have just come back from another test's outage
    setup.stop_database()
    try:

        def taken_out() -> None:
            assert not gateway_sees(setup.gateway, setup.target)

        eventually(taken_out, within=10)
        assert health(setup.target, "") == SERVING  # the process itself was never in doubt
    finally:
        setup.start_database()
    eventually(back, within=10)


def test_the_gateway_answers_its_health_path_until_it_drains(setup: Setup) -> None:
    listener = f"http://127.0.0.1:{setup.gateway.port}{HEALTH_PATH}"
    admin = f"http://127.0.0.1:{setup.gateway.admin_port}"
    assert http_status(listener) == 200
    assert http_status(f"{admin}/healthcheck/fail") == 200
    try:
        assert http_status(listener) == 503
    finally:
        assert http_status(f"{admin}/healthcheck/ok") == 200
    assert http_status(listener) == 200


class _Context:
    """What Check needs of a call's context for a name it knows: nothing."""


async def _status(health: HealthServicer, name: str) -> int:
    reply = await health.Check(health_pb2.HealthCheckRequest(service=name), _Context())
    return int(reply.status)


def test_a_service_name_serves_only_with_its_database_and_no_breach() -> None:
    async def scenario() -> list[tuple[int, int]]:
        health = HealthServicer()
        state = HealthState(health, "sites", ["towerco.sites.v1.SiteService"])
        seen = []

        async def look() -> None:
            seen.append((await _status(health, ""), await _status(health, "towerco.sites.v1.SiteService")))

        await state.serving()
        await look()
        await state.isolation(False)  # a breach
        await state.database(False, "OSError: refused")
        await look()
        await state.database(True)  # the database is back, the breach stands
        await look()
        await state.isolation(True)
        await look()
        await state.database(False, "OSError: refused")
        await look()
        return seen

    assert asyncio.run(scenario()) == [
        (SERVING, SERVING),
        (SERVING, NOT_SERVING),
        (SERVING, NOT_SERVING),
        (SERVING, SERVING),
        (SERVING, NOT_SERVING),
    ]


async def test_the_probe_takes_two_failures_in_a_row_to_say_the_database_is_away(sites_runtime_dsn: str) -> None:
    reports: list[tuple[bool, str]] = []
    reported = asyncio.Event()

    async def report(reachable: bool, reason: str) -> None:
        reports.append((reachable, reason))
        reported.set()

    answering = DatabaseProbe(sites_runtime_dsn, report, application_name="towerco-test/health", interval=0.01)
    assert await answering.probe() == ""
    await answering.close()

    closed = f"postgresql://sites_app@127.0.0.1:{free_port()}/towerco"
    probe = DatabaseProbe(closed, report, application_name="towerco-test/health", interval=0.01)
    probe.start()
    try:
        await asyncio.wait_for(reported.wait(), 10)
    finally:
        await probe.close()
    reachable, reason = reports[0]
    assert not reachable and "refused" in reason.lower(), reason
    assert probe.failures >= 2 and probe.probes == probe.failures
    assert len(reports) == probe.failures - 1  # the first failure alone reported nothing
