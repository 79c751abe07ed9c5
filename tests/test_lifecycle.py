"""A service process's life: it drains in-flight calls on SIGTERM and then exits cleanly."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as pb_grpc

from .support import bearer


async def test_sigterm_drains_in_flight_call_then_exits(extra_sites, admin_dsn, token, tenant_pair):
    tenant, _ = tenant_pair
    extra = extra_sites(
        {"SHUTDOWN_GRACE_SECONDS": "20", "SHUTDOWN_DELAY_SECONDS": "3", "DB_STATEMENT_TIMEOUT_MS": "30000"}
    )
    md = bearer(token(tenant))
    channel = grpc.insecure_channel(extra.target)
    stub = pb_grpc.SiteServiceStub(channel)
    stub.CreateSite(pb.CreateSiteRequest(site_id="DRAIN-1", site=pb.Site(name="before")), metadata=md, timeout=10)

    # Hold the row lock so the UpdateSite below is in flight (blocked in the database)
    # when SIGTERM arrives.
    admin: asyncpg.Connection[Any] = await asyncpg.connect(admin_dsn)
    lock = admin.transaction()
    await lock.start()
    await admin.execute("SELECT 1 FROM sites.sites WHERE tenant_id = $1 AND site_id = 'DRAIN-1' FOR UPDATE", tenant)

    result: dict[str, Any] = {}

    def update() -> None:
        try:
            result["site"] = stub.UpdateSite(
                pb.UpdateSiteRequest(site=pb.Site(site_id="DRAIN-1", name="during shutdown")),
                metadata=md,
                timeout=30,
            )
        except grpc.RpcError as error:
            result["error"] = error

    caller = threading.Thread(target=update)
    caller.start()
    # pg_stat_activity is snapshotted per transaction: watch from a second connection.
    watcher: asyncpg.Connection[Any] = await asyncpg.connect(admin_dsn)
    try:
        deadline = time.monotonic() + 10
        blocked = 0
        while not blocked and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            blocked = await watcher.fetchval(
                """SELECT count(*) FROM pg_stat_activity
                   WHERE wait_event_type = 'Lock' AND usename = 'sites_app' AND query LIKE '%FOR UPDATE%'"""
            )
    finally:
        await watcher.close()
    assert blocked, f"the UpdateSite call never reached the database: {result}"

    extra.process.send_signal(signal.SIGTERM)
    # While draining, health says NOT_SERVING and the process is still alive.
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 10
    status = None
    while time.monotonic() < deadline:
        try:
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
        except grpc.RpcError:
            status = None
        if status == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        await asyncio.sleep(0.05)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert extra.process.poll() is None

    await lock.rollback()
    await admin.close()
    caller.join(30)
    assert "error" not in result, result.get("error")
    assert result["site"].name == "during shutdown"
    assert extra.process.wait(30) == 0
    output = extra.output()
    assert "shutting down" in output and "stopped" in output
    channel.close()

    # The drained write is durable: the session's own sites process reads it back.
    assert await _fetch_name(admin_dsn, tenant, "DRAIN-1") == "during shutdown", (
        "the call that was in flight at SIGTERM was not committed"
    )


async def _fetch_name(dsn: str, tenant: str, site_id: str) -> str:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn)
    try:
        name: str = await conn.fetchval(
            "SELECT name FROM sites.sites WHERE tenant_id = $1 AND site_id = $2", tenant, site_id
        )
        return name
    finally:
        await conn.close()
