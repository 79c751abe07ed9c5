"""A service run as several worker processes on one port (``SITES_WORKERS=2``).

Sites services of the tests' own beside the session stack, each a parent with two workers,
logging JSON lines that say which worker wrote them. The kernel spreads connections, not
calls, over the workers: a test reaches both by opening connections until each has answered
one (its access line names the worker), then keeps one connection per worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from towerco.features.v1 import feature_gate_service_pb2 as features_pb
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as pb_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as registry_pb

from deploy.local.stack import REPO, Stack

from .support import bearer, free_port, rich_error
from .support.processes import ExtraService, ExtraServices

WORKERS = 2
Metadata = tuple[tuple[str, str], ...]


def _env(metrics_port: int, **extra: str) -> dict[str, str]:
    return {"SITES_WORKERS": str(WORKERS), "LOG_FORMAT": "json", "SITES_METRICS_PORT": str(metrics_port), **extra}


def _start(start: Callable[..., ExtraService], metrics_port: int, **extra: str) -> ExtraService:
    """A sites service of two workers (``start``: extra_service's); returns once both say they serve."""
    service = start("sites", _env(metrics_port, **extra))
    deadline = 60
    for _ in range(deadline * 10):
        serving = {line["worker"] for line in _lines(service) if "serving on" in line["message"] and "worker" in line}
        if len(serving) == WORKERS:
            return service
        assert service.process.poll() is None, service.output()[-4000:]
        time.sleep(0.1)
    raise AssertionError(f"not every worker served within {deadline}s: {service.output()[-4000:]}")


def _lines(service: ExtraService) -> list[dict[str, Any]]:
    parsed = []
    for line in service.output().splitlines():
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return parsed


def _answered_by(service: ExtraService, request_id: str) -> int:
    """The worker whose access line names ``request_id``."""
    for line in _lines(service):
        if line.get("logger") == "towerco.access" and line.get("request_id") == request_id:
            return int(line["worker"])
    raise AssertionError(f"no access line for {request_id}")


def _connection(target: str) -> grpc.Channel:
    # A connection of its own: channels otherwise share the process's subchannels (one worker).
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def _one_connection_per_worker(
    service: ExtraService, md: Metadata, eventually: Callable[..., Any]
) -> tuple[dict[int, grpc.Channel], int]:
    """A connection to each worker, and how many calls finding them took (each a ListSites)."""
    pinned: dict[int, grpc.Channel] = {}
    calls = 0
    while len(pinned) < WORKERS:
        assert calls < 64, f"64 connections all reached workers {sorted(pinned)}"  # odds 2**-63 with two
        channel = _connection(service.target)
        request_id = f"workers-{uuid.uuid4().hex}"
        pb_grpc.SiteServiceStub(channel).ListSites(
            pb.ListSitesRequest(page_size=1), metadata=(*md, ("x-request-id", request_id)), timeout=10
        )
        calls += 1
        worker = eventually(lambda rid=request_id: _answered_by(service, rid), within=10.0, interval=0.05)
        if worker in pinned:
            channel.close()
        else:
            pinned[worker] = channel
    return pinned, calls


def _until_every_worker_refuses(
    pinned: dict[int, grpc.Channel], md: Metadata, refusal: Callable[[Any], bool], eventually: Callable[..., Any]
) -> None:
    """Each worker refuses the tenant's ListSites (``refusal`` says the error is the one expected) within 10 s."""

    def refused_by(worker: int) -> None:
        try:
            pb_grpc.SiteServiceStub(pinned[worker]).ListSites(pb.ListSitesRequest(page_size=1), metadata=md, timeout=10)
        except grpc.RpcError as error:
            assert refusal(error), error
            return
        raise AssertionError(f"worker {worker} still serves the tenant")

    for worker in sorted(pinned):
        eventually(lambda w=worker: refused_by(w), within=10.0, interval=0.1)
        pinned[worker].close()


def _children(parent: int) -> set[int]:
    """The live processes whose parent is ``parent`` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _scraped(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    families = text_string_to_metric_families(text)
    samples = [s for f in families for s in f.samples if s.name == name]
    return sum(s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def two_workers(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ExtraService, int]]:
    """One sites service of two workers for the tests that do not stop it, and its metrics port.

    TENANT_CACHE_SECONDS is long: a worker learns of a tenant's change (its state, its
    entitlements) only by being told.
    """
    services = ExtraServices(stack, tmp_path_factory.mktemp("workers"))
    metrics_port = free_port()
    try:
        yield _start(services.start, metrics_port, TENANT_CACHE_SECONDS="300"), metrics_port
    finally:
        services.stop()


def test_two_workers_answer_calls_on_one_port_and_metrics_sum_over_both(
    two_workers: tuple[ExtraService, int], new_tenant: Callable[..., str], token: Callable[..., str], eventually
) -> None:
    service, metrics_port = two_workers
    tenant = new_tenant()
    md = bearer(token(tenant))
    pinned, calls = _one_connection_per_worker(service, md, eventually)
    workers = _children(service.process.pid)
    assert len(workers) == WORKERS, workers
    for worker, count in zip(sorted(pinned), (2, 3), strict=True):
        stub = pb_grpc.SiteServiceStub(pinned[worker])
        for _ in range(count):
            stub.ListSites(pb.ListSitesRequest(page_size=1), metadata=md, timeout=10)
        calls += count
    answered = {line["worker"] for line in _lines(service) if line.get("tenant") == tenant and "method" in line}
    assert answered == set(range(WORKERS)), answered

    def summed() -> None:
        counted = _scraped(metrics_port, "towerco_tenant_calls_total", tenant=tenant, service="sites", outcome="ok")
        assert counted == calls, f"/metrics counts {counted} of the {calls} calls made over both workers"

    eventually(summed, within=10.0, interval=0.1)
    for channel in pinned.values():
        channel.close()


def test_a_suspension_reaches_every_worker(
    two_workers: tuple[ExtraService, int],
    new_tenant: Callable[..., str],
    token: Callable[..., str],
    registry: Any,
    platform_token: str,
    eventually: Callable[..., Any],
) -> None:
    service, _ = two_workers
    tenant = new_tenant()
    md = bearer(token(tenant))
    pinned, _ = _one_connection_per_worker(service, md, eventually)  # each worker now holds it ACTIVE
    registry.SuspendTenant(
        registry_pb.SuspendTenantRequest(tenant_id=tenant, reason="workers test"),
        metadata=bearer(platform_token),
        timeout=10,
    )

    _until_every_worker_refuses(pinned, md, lambda error: error.code() == grpc.StatusCode.PERMISSION_DENIED, eventually)


def test_an_entitlement_change_reaches_every_worker(
    two_workers: tuple[ExtraService, int],
    new_tenant: Callable[..., str],
    token: Callable[..., str],
    features: Any,
    platform_token: str,
    eventually: Callable[..., Any],
) -> None:
    service, _ = two_workers
    tenant = new_tenant()
    md = bearer(token(tenant))
    pinned, _ = _one_connection_per_worker(service, md, eventually)  # each worker now holds its entitlements
    features.SetLimitOverride(  # no call of the tenant may run
        features_pb.SetLimitOverrideRequest(tenant_id=tenant, resource="call_concurrency", limit=0),
        metadata=bearer(platform_token),
        timeout=10,
    )

    _until_every_worker_refuses(pinned, md, lambda error: rich_error(error).reason == "TENANT_CALLS_LIMIT", eventually)


def test_two_workers_share_a_tenants_rate_through_redis(
    two_workers: tuple[ExtraService, int],
    new_tenant: Callable[..., str],
    token: Callable[..., str],
    features: Any,
    platform_token: str,
    eventually: Callable[..., Any],
) -> None:
    service, _ = two_workers
    pinned, _ = _one_connection_per_worker(service, bearer(token(new_tenant())), eventually)
    tenant = new_tenant()
    md = bearer(token(tenant))
    features.SetLimitOverride(  # one read a minute and no burst: a second admission means two budgets
        features_pb.SetLimitOverrideRequest(tenant_id=tenant, resource="rpm_read", limit=1),
        metadata=bearer(platform_token),
        timeout=10,
    )
    answers: dict[int, list[str]] = {worker: [] for worker in pinned}
    for _ in range(3):
        for worker, channel in sorted(pinned.items()):
            try:
                pb_grpc.SiteServiceStub(channel).ListSites(pb.ListSitesRequest(page_size=1), metadata=md, timeout=10)
            except grpc.RpcError as error:
                answers[worker].append(rich_error(error).reason)
            else:
                answers[worker].append("ADMITTED")
    every = [answer for worker_answers in answers.values() for answer in worker_answers]
    assert every.count("ADMITTED") == 1, answers  # one budget for the tenant, held in Redis, not one per worker
    assert every.count("RATE_LIMITED") == len(every) - 1, answers
    assert all("RATE_LIMITED" in worker_answers for worker_answers in answers.values()), answers


def test_a_second_copy_on_the_taken_port_is_refused_in_one_line(
    two_workers: tuple[ExtraService, int], stack: Stack
) -> None:
    service, _ = two_workers
    port = int(service.target.rpartition(":")[2])
    env = stack.service_env({"SITES_PORT": str(port), **_env(free_port(), MIGRATE_ON_START="false")})
    env["LOG_FORMAT"] = "text"
    result = subprocess.run(
        [sys.executable, "-m", "services.sites"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in lines[0] and "SITES_PORT" in lines[0], lines[0]


async def _blocked_on_lock(admin_dsn: str, pids: set[int]) -> set[int]:
    """Which of the worker ``pids`` have a call waiting on a row lock (their application_name has the pid)."""
    conn: asyncpg.Connection[Any] = await asyncpg.connect(admin_dsn)
    try:
        rows = await conn.fetch(
            "SELECT application_name FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND usename = 'sites_app'"
        )
    finally:
        await conn.close()
    waiting = {str(row["application_name"]).rpartition("/")[2] for row in rows}  # towerco-sites/<pid>
    return {pid for pid in pids if str(pid) in waiting}


async def test_sigterm_drains_every_worker_then_the_parent_exits_0(
    extra_service: Callable[..., ExtraService],
    admin_dsn: str,
    new_tenant: Callable[..., str],
    token: Callable[..., str],
    eventually: Callable[..., Any],
) -> None:
    service = _start(extra_service, free_port(), SHUTDOWN_DELAY_SECONDS="1", SHUTDOWN_GRACE_SECONDS="20")
    tenant = new_tenant()
    md = bearer(token(tenant))
    pinned, _ = _one_connection_per_worker(service, md, eventually)
    workers = _children(service.process.pid)
    stubs = {worker: pb_grpc.SiteServiceStub(channel) for worker, channel in pinned.items()}
    for worker, stub in stubs.items():
        stub.CreateSite(pb.CreateSiteRequest(site_id=f"DRAIN-{worker}", site=pb.Site(name="before")), metadata=md)
    # Each worker's UpdateSite waits on a row lock held here: in flight when SIGTERM arrives.
    admin: asyncpg.Connection[Any] = await asyncpg.connect(admin_dsn)
    lock = admin.transaction()
    await lock.start()
    await admin.execute("SELECT 1 FROM sites.sites WHERE tenant_id = $1 FOR UPDATE", tenant)
    updates: dict[int, grpc.CallFuture[pb.Site]] = {
        worker: stub.UpdateSite.future(
            pb.UpdateSiteRequest(site=pb.Site(site_id=f"DRAIN-{worker}", name="drained")), metadata=md, timeout=60
        )
        for worker, stub in stubs.items()
    }
    try:
        for _ in range(600):  # 30 s at most
            if await _blocked_on_lock(admin_dsn, workers) == workers:
                break
            await asyncio.sleep(0.05)
        assert await _blocked_on_lock(admin_dsn, workers) == workers, "not every worker had a call in flight"

        service.process.send_signal(signal.SIGTERM)

        def not_serving(channel: grpc.Channel) -> None:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

        for channel in pinned.values():
            eventually(lambda c=channel: not_serving(c), within=10.0, interval=0.05)
        assert service.process.poll() is None
    finally:
        await lock.rollback()
        await admin.close()
    for worker, update in updates.items():
        assert update.result(timeout=30).name == "drained", worker
    assert service.process.wait(30) == 0, service.output()[-4000:]
    assert not [pid for pid in workers if _alive(pid)], "a worker outlived its parent"
    for channel in pinned.values():
        channel.close()


def test_a_worker_killed_stops_the_others_and_the_parent_exits_non_zero(
    extra_service: Callable[..., ExtraService],
) -> None:
    service = _start(extra_service, free_port(), SHUTDOWN_DELAY_SECONDS="0.2")
    workers = sorted(_children(service.process.pid))
    os.kill(workers[0], signal.SIGKILL)
    assert service.process.wait(30) == 1, service.output()[-4000:]
    assert not [pid for pid in workers if _alive(pid)], "a worker outlived its parent"
    stopped = [line["message"] for line in _lines(service) if "while serving" in line["message"]]
    assert stopped == [f"sites: worker pid {workers[0]} exited with code -9 while serving: stopping the others"]


def test_workers_stop_when_their_parent_is_killed(extra_service: Callable[..., ExtraService]) -> None:
    service = _start(extra_service, free_port(), SHUTDOWN_DELAY_SECONDS="0.2")
    workers = _children(service.process.pid)
    service.process.kill()
    service.process.wait(10)
    for _ in range(300):
        if not [pid for pid in workers if _alive(pid)]:
            break
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)], "workers kept running without their parent"
    said = [line["message"] for line in _lines(service)]
    assert sum("the parent process is gone" in message for message in said) == WORKERS, said
    assert sum("port closed, draining" in message for message in said) == WORKERS, said
