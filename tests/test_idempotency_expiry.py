"""Idempotency records expire: a ``request_id`` is honoured for IDEMPOTENCY_WINDOW_SECONDS only.

Records are aged by moving their ``create_time`` back (as a superuser), so nothing here
waits for a window to pass.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import asyncpg
import grpc
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb
from towerco.tenant.v1 import tenant_registry_service_pb2_grpc as tenant_grpc

from services.runtime import context, metrics
from services.runtime.db import Database
from services.runtime.idempotency_purge import IdempotencyPurge, request_table
from services.tenant import queries as tenant_queries

from .support import bearer, expect_error

TABLE = "sites.create_requests"
WINDOW = {"IDEMPOTENCY_WINDOW_SECONDS": "60"}


def create(site_id: str, request_id: str, name: str = "Mast") -> pb.CreateSiteRequest:
    return pb.CreateSiteRequest(site_id=site_id, site=pb.Site(name=name), request_id=request_id)


async def records(admin: asyncpg.Connection[Any], tenant_id: str) -> set[str]:
    rows = await admin.fetch(f"SELECT request_id FROM {TABLE} WHERE tenant_id = $1", tenant_id)
    return {r["request_id"] for r in rows}


async def age(admin: asyncpg.Connection[Any], tenant_id: str, request_id: str, seconds: int = 120) -> None:
    await admin.execute(
        f"UPDATE {TABLE} SET create_time = now() - make_interval(secs => $3) WHERE tenant_id = $1 AND request_id = $2",
        tenant_id,
        request_id,
        float(seconds),
    )


async def test_a_retry_inside_the_window_replays_and_after_it_is_answered_as_a_new_request(
    extra_sites, new_tenant, token, admin
):
    tenant = new_tenant()
    md = bearer(token(tenant))
    extra = extra_sites({**WINDOW, "IDEMPOTENCY_PURGE_INTERVAL_SECONDS": "3600"})  # no purge during the test
    with grpc.insecure_channel(extra.target) as channel:
        sites = sites_grpc.SiteServiceStub(channel)
        first = sites.CreateSite(create("mast-1", "req-1"), metadata=md, timeout=10)
        assert sites.CreateSite(create("mast-1", "req-1"), metadata=md, timeout=10) == first  # replayed
        assert await admin.fetchval("SELECT count(*) FROM sites.sites WHERE tenant_id = $1", tenant) == 1

        # Past the window, before any purge: the record no longer answers, the site still exists.
        await age(admin, tenant, "req-1")
        err = expect_error(sites.CreateSite, create("mast-1", "req-1"), metadata=md)
        assert (err.code, err.reason) == (grpc.StatusCode.ALREADY_EXISTS, "SITE_ALREADY_EXISTS"), err

        # The request_id is free again: another site under it is a new create (was REQUEST_ID_REUSED)...
        second = sites.CreateSite(create("mast-2", "req-1", "Other"), metadata=md, timeout=10)
        assert second.name == "Other"
        # ...whose answer the retry now gets.
        assert sites.CreateSite(create("mast-2", "req-1", "Other"), metadata=md, timeout=10) == second
    assert await admin.fetchval("SELECT count(*) FROM sites.sites WHERE tenant_id = $1", tenant) == 2


async def test_the_sites_service_purges_expired_records_on_its_own(extra_sites, new_tenant, token, admin):
    tenant = new_tenant()
    md = bearer(token(tenant))
    extra = extra_sites({**WINDOW, "IDEMPOTENCY_PURGE_INTERVAL_SECONDS": "0.2"})
    with grpc.insecure_channel(extra.target) as channel:
        sites = sites_grpc.SiteServiceStub(channel)
        sites.CreateSite(create("mast-1", "old"), metadata=md, timeout=10)
        sites.CreateSite(create("mast-2", "new"), metadata=md, timeout=10)
    await age(admin, tenant, "old")
    for _ in range(100):  # the purge runs every 0.2 s; 10 s at most
        if await records(admin, tenant) == {"new"}:
            break
        await asyncio.sleep(0.1)
    assert await records(admin, tenant) == {"new"}
    logged = extra.log_path.read_text()
    assert f"removed 1 from {TABLE} for tenant {tenant}" in logged, logged[-2000:]


async def test_the_purge_removes_only_expired_records_of_each_tenant(sites_runtime_dsn, admin, caplog):
    tenants = [f"purge_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for tenant in tenants:
        await admin.executemany(
            f"INSERT INTO {TABLE} (tenant_id, request_id, request_hash, response, create_time) "
            "VALUES ($1, $2, 'h', '', now() - make_interval(secs => $3))",
            [(tenant, f"old-{i}", 120.0) for i in range(5)] + [(tenant, "fresh", 0.0)],
        )
    counter = metrics.RETENTION_PURGED_ROWS.labels(metrics.active().service, TABLE)
    before = counter._value.get()
    db = await Database.connect(sites_runtime_dsn, min_size=1, max_size=2)
    try:
        # Batches of 2: five expired records per tenant take three transactions each.
        purge = IdempotencyPurge(db, request_table(TABLE), window=60, interval=3600, batch=2)
        with caplog.at_level(logging.INFO, logger="towerco.idempotency"):
            removed = await purge.purge()
        # Bound to each tenant in turn: a purge in one tenant's transaction sees no other's rows.
        with context.system_scope(tenants[0], "test"):
            async with db.transaction(readonly=True) as conn:
                seen = await conn.fetchval(f"SELECT count(*) FROM {TABLE} WHERE tenant_id = $1", tenants[1])
    finally:
        await db.close()
    assert seen == 0
    for tenant in tenants:
        assert removed[tenant] == 5
        assert await records(admin, tenant) == {"fresh"}
        assert f"removed 5 from {TABLE} for tenant {tenant}" in caplog.text
    assert counter._value.get() - before >= 10
    await admin.execute(f"DELETE FROM {TABLE} WHERE tenant_id = ANY($1)", tenants)


async def test_a_create_tenant_retry_past_the_window_is_already_exists_and_its_key_is_cleared(
    extra_service, registry, platform_token, stack, admin, caplog
):
    tenant_id = f"idem_{uuid.uuid4().hex[:10]}"
    request = tenant_pb.CreateTenantRequest(
        tenant_id=tenant_id,
        tenant=tenant_pb.Tenant(display_name="Idem", plan="basic", admin_email="noc@idem.example"),
        request_id=f"new-{tenant_id}",
    )
    md = bearer(platform_token)
    first = registry.CreateTenant(request, metadata=md, timeout=10)
    assert registry.CreateTenant(request, metadata=md, timeout=10) == first  # replayed inside the window

    await admin.execute(
        "UPDATE tenant.tenants SET create_time = now() - interval '2 minutes' WHERE tenant_id = $1", tenant_id
    )
    # Its purge would run in an hour: the retry meets the expired key still in place.
    extra = extra_service("tenant", {**WINDOW, "IDEMPOTENCY_PURGE_INTERVAL_SECONDS": "3600"})
    with grpc.insecure_channel(extra.target) as channel:
        err = expect_error(tenant_grpc.TenantRegistryServiceStub(channel).CreateTenant, request, metadata=md)
    assert (err.code, err.reason) == (grpc.StatusCode.ALREADY_EXISTS, "TENANT_ALREADY_EXISTS"), err

    db = await Database.connect(stack.runtime_dsn("tenant"), min_size=1, max_size=1)
    try:
        with caplog.at_level(logging.INFO, logger="towerco.idempotency"):
            removed = await IdempotencyPurge(db, tenant_queries.TENANT_REQUESTS, window=60, interval=3600).purge()
    finally:
        await db.close()
    assert removed.get(tenant_id) == 1
    assert f"removed 1 from tenant.tenants for tenant {tenant_id}" in caplog.text
    row = await admin.fetchrow(
        "SELECT request_id, request_hash, state FROM tenant.tenants WHERE tenant_id = $1", tenant_id
    )
    assert (row["request_id"], row["request_hash"], row["state"]) == (None, None, "STATE_ACTIVE")  # the tenant stays
