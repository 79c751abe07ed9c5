"""Database cells with real PostgreSQL servers: placement, routing by tenant, a cell going away.

A stack of this module's own: the home cell ``cell1``, a shared ``cell2`` and a dedicated
``cell3``, each an embedded PostgreSQL server of its own (the session stack keeps one).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from towerco.audit.v1 import audit_log_service_pb2 as audit_pb
from towerco.features.v1 import feature_gate_service_pb2 as features_pb
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb

from deploy.local.stack import REPO, Stack, StackConfig
from services.runtime.cells import CELLS, Cell
from services.runtime.db import Database
from services.runtime.environment import SettingsError
from services.runtime.idempotency_purge import IdempotencyPurge, request_table
from services.runtime.settings import _cell_database_urls
from tests.support.cells_stack import CellsStack, cells_stack
from tests.support.errors import expect_error
from tests.support.metadata import Metadata, bearer
from tests.support.requests import create_site

from .conftest import OUTPUT

#: The schemas holding tenant-owned rows in the tenant's cell.
CELL_SCHEMAS = ("sites", "features", "audit")


@pytest.fixture(scope="module")
def cells() -> Iterator[CellsStack]:
    env = {"LOG_LEVEL": "INFO", "USAGE_FLUSH_SECONDS": "0.5"}
    with cells_stack(OUTPUT, "cells", (Cell("cell1"), Cell("cell2"), Cell("cell3", dedicated=True)), env) as stack:
        yield stack


def _rows_of(dsn: str, tenant_id: str) -> dict[str, int]:
    """Every row of ``tenant_id`` in the cell schemas of one server, by table, read as its owner (no RLS)."""

    async def count() -> dict[str, int]:
        conn = await asyncpg.connect(dsn)
        try:
            tables = await conn.fetch(
                "SELECT table_schema, table_name FROM information_schema.columns "
                "JOIN information_schema.tables USING (table_schema, table_name) "
                "WHERE column_name = 'tenant_id' AND table_type = 'BASE TABLE' AND table_schema = ANY($1::text[])",
                list(CELL_SCHEMAS),
            )
            found = {}
            for t in tables:
                name = f"{t['table_schema']}.{t['table_name']}"
                found[name] = await conn.fetchval(f"SELECT count(*) FROM {name} WHERE tenant_id = $1", tenant_id)
            return found
        finally:
            await conn.close()

    return asyncio.run(count())


def _tenants_per_cell(stack: Stack) -> dict[str, int]:
    async def count() -> dict[str, int]:
        conn = await asyncpg.connect(stack.database_url)
        try:
            rows = await conn.fetch(
                "SELECT coalesce(cell, 'cell1') AS cell, count(*) AS n FROM tenant.tenants "
                "WHERE state <> 'STATE_DELETED' GROUP BY 1"
            )
            return {row["cell"]: row["n"] for row in rows}
        finally:
            await conn.close()

    return asyncio.run(count())


def _wait_for_event(audit: Any, md: Metadata, action: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        events = audit.ListEvents(audit_pb.ListEventsRequest(action=action), metadata=md, timeout=10).events
        if events:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {action} event reached the audit log within 20 s")


def test_new_tenants_go_to_the_shared_cell_holding_fewest_tenants(cells: CellsStack) -> None:
    placed = []
    start = _tenants_per_cell(cells.stack)  # the home cell holds the registry's reserved rows already
    for _ in range(abs(start.get("cell1", 0) - start.get("cell2", 0)) + 2):
        before = _tenants_per_cell(cells.stack)
        fewest = min(("cell1", "cell2"), key=lambda name: (before.get(name, 0), name))
        created = cells.create_tenant()
        assert created.cell == fewest, (before, created.cell)
        placed.append(created.cell)
    # Never the dedicated cell unasked, and both shared cells took some.
    assert "cell3" not in placed
    assert set(placed) == {"cell1", "cell2"}


def test_a_tenant_in_cell2_has_every_rpc_working_and_its_rows_only_on_cell2(cells: CellsStack) -> None:
    tenant = cells.create_tenant(cell="cell2")
    assert tenant.cell == "cell2"
    md = cells.token(tenant.tenant_id)
    # Sites CRUD.
    create_site(cells.sites, md, "tower-1")
    create_site(cells.sites, md, "tower-2")
    got = cells.sites.GetSite(sites_pb.GetSiteRequest(site_id="tower-1"), metadata=md, timeout=10)
    assert got.site_id == "tower-1"
    update = sites_pb.UpdateSiteRequest(
        site=sites_pb.Site(site_id="tower-1", name="Renamed"), update_mask=field_mask_pb2.FieldMask(paths=["name"])
    )
    assert cells.sites.UpdateSite(update, metadata=md, timeout=10).name == "Renamed"
    cells.sites.DeleteSite(sites_pb.DeleteSiteRequest(site_id="tower-2"), metadata=md, timeout=10)
    listed = cells.sites.ListSites(sites_pb.ListSitesRequest(), metadata=md, timeout=10).sites
    assert [s.site_id for s in listed] == ["tower-1"]
    # Features: entitlements, and an override kept in the cell.
    set_override = features_pb.SetLimitOverrideRequest(tenant_id=tenant.tenant_id, resource="max_sites", limit=7)
    cells.features.SetLimitOverride(set_override, metadata=bearer(cells.platform), timeout=10)
    entitlements = cells.features.GetEntitlements(features_pb.GetEntitlementsRequest(), metadata=md, timeout=10)
    assert entitlements.plan == "professional"
    assert dict(entitlements.limits)["max_sites"] == 7
    # Settings (the registry's, in the home cell).
    settings = cells.registry.GetTenantSettings(tenant_pb.GetTenantSettingsRequest(), metadata=md, timeout=10)
    settings.localization.currency = "KES"  # any plan's (its colours would need custom_branding)
    updated = cells.registry.UpdateTenantSettings(
        tenant_pb.UpdateTenantSettingsRequest(
            settings=settings, update_mask=field_mask_pb2.FieldMask(paths=["localization.currency"])
        ),
        metadata=md,
        timeout=10,
    )
    assert updated.localization.currency == "KES"
    # Audit: the registry's event (from the home cell's outbox) and the sites' ones, on one valid chain.
    _wait_for_event(cells.audit, md, "tenants.create")
    _wait_for_event(cells.audit, md, "sites.delete")
    verified = cells.audit.VerifyChain(audit_pb.VerifyChainRequest(), metadata=md, timeout=10)
    assert verified.valid, verified
    # On each server directly: the tenant's rows are all in cell2, none in cell1.
    on_cell1 = _rows_of(cells.stack.database_url, tenant.tenant_id)
    on_cell2 = _rows_of(cells.stack.cell_urls["cell2"], tenant.tenant_id)
    assert sum(on_cell1.values()) == 0, on_cell1
    assert on_cell2["sites.sites"] == 1
    assert on_cell2["audit.events"] >= 4
    assert on_cell2["features.limit_overrides"] == 1


def test_only_platform_admins_see_the_cell_on_the_tenant_record(cells: CellsStack) -> None:
    tenant = cells.create_tenant(cell="cell2")
    request = tenant_pb.GetTenantRequest(tenant_id=tenant.tenant_id)
    assert cells.registry.GetTenant(request, metadata=bearer(cells.platform), timeout=10).cell == "cell2"
    own = cells.registry.GetTenant(tenant_pb.GetTenantRequest(), metadata=cells.token(tenant.tenant_id), timeout=10)
    assert own.tenant_id == tenant.tenant_id
    assert own.cell == ""


def test_an_enterprise_tenant_may_be_placed_in_a_dedicated_cell(cells: CellsStack) -> None:
    tenant = cells.create_tenant(plan="enterprise", cell="cell3")
    assert tenant.cell == "cell3"
    create_site(cells.sites, cells.token(tenant.tenant_id), "big-1")
    assert _rows_of(cells.stack.cell_urls["cell3"], tenant.tenant_id)["sites.sites"] == 1


@pytest.mark.parametrize(("plan", "cell"), [("basic", "cell3"), ("professional", "cell9")])
def test_a_placement_the_plan_or_the_platform_does_not_allow_is_invalid_argument_on_cell(
    cells: CellsStack, plan: str, cell: str
) -> None:
    tenant_id = f"c_{uuid.uuid4().hex[:10]}"
    request = tenant_pb.CreateTenantRequest(
        tenant_id=tenant_id,
        tenant=tenant_pb.Tenant(display_name="Refused", plan=plan, admin_email="noc@cells.example"),
        cell=cell,
    )
    error = expect_error(cells.registry.CreateTenant, request, metadata=bearer(cells.platform))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.fields == ["cell"]
    missing = expect_error(
        cells.registry.GetTenant,
        tenant_pb.GetTenantRequest(tenant_id=tenant_id),
        metadata=bearer(cells.platform),
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND


def test_the_isolation_canary_seeds_its_sentinels_in_every_cell(cells: CellsStack) -> None:
    for cell in ("cell2", "cell3"):
        for canary in ("canary_a", "canary_b"):
            rows = _rows_of(cells.stack.cell_urls[cell], canary)
            assert rows["sites.sites"] >= 1, (cell, canary, rows)


def test_the_idempotency_purge_removes_expired_records_in_every_cell(cells: CellsStack) -> None:
    placed = {cell: cells.create_tenant(cell=cell).tenant_id for cell in ("cell1", "cell2")}
    servers = {"cell1": cells.stack.database_url, "cell2": cells.stack.cell_urls["cell2"]}
    table = "sites.create_requests"

    async def run() -> tuple[dict[str, int], dict[str, set[str]]]:
        for cell, tenant in placed.items():
            conn = await asyncpg.connect(servers[cell])
            try:
                await conn.executemany(
                    f"INSERT INTO {table} (tenant_id, request_id, request_hash, response, create_time) "
                    "VALUES ($1, $2, 'h', '', now() - make_interval(secs => $3))",
                    [(tenant, f"old-{i}", 120.0) for i in range(3)] + [(tenant, "fresh", 0.0)],
                )
            finally:
                await conn.close()
        db = await Database.connect(
            cells.stack.runtime_dsn("sites"),
            min_size=1,
            max_size=2,
            cell_dsns={cell: cells.stack.cell_runtime_dsn(cell, "sites") for cell in ("cell2", "cell3")},
        )
        where = {tenant: cell for cell, tenant in placed.items()}

        async def cell_of(tenant_id: str) -> str:
            return where.get(tenant_id, "")

        db.route_cells(cell_of)
        try:
            removed = await IdempotencyPurge(db, request_table(table), window=60, interval=3600, batch=2).purge()
        finally:
            await db.close()
        left = {}
        for cell, tenant in placed.items():
            conn = await asyncpg.connect(servers[cell])
            try:
                rows = await conn.fetch(f"SELECT request_id FROM {table} WHERE tenant_id = $1", tenant)
                left[tenant] = {row["request_id"] for row in rows}
            finally:
                await conn.close()
        return removed, left

    removed, left = asyncio.run(run())
    for tenant in placed.values():
        assert removed[tenant] == 3, removed
        assert left[tenant] == {"fresh"}


def test_list_tenant_usage_reads_every_cell(cells: CellsStack) -> None:
    placed = {cell: cells.create_tenant(cell=cell).tenant_id for cell in ("cell1", "cell2")}
    for tenant in placed.values():
        create_site(cells.sites, cells.token(tenant), "metered")
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    request = features_pb.ListTenantUsageRequest(page_size=500)
    request.start_time.FromDatetime(now - timedelta(hours=1))
    request.end_time.FromDatetime(now + timedelta(hours=1))
    deadline = time.monotonic() + 20
    while True:  # each process flushes its usage every USAGE_FLUSH_SECONDS (0.5 s here)
        listed = cells.features.ListTenantUsage(request, metadata=bearer(cells.platform), timeout=10).tenants
        found = {t.tenant_id: t.totals.write_calls for t in listed}
        if all(found.get(tenant) for tenant in placed.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(found.get(tenant, 0) >= 1 for tenant in placed.values()), found
    # One page, ordered by tenant id across the cells.
    assert [t.tenant_id for t in listed] == sorted(t.tenant_id for t in listed)


def test_cells_setting_takes_a_count_or_names_and_refuses_a_dedicated_home_cell() -> None:
    assert CELLS.read({"CELLS": "2"}) == (Cell("cell1"), Cell("cell2"))
    assert CELLS.read({"CELLS": "eu1, eu2:dedicated"}) == (Cell("eu1"), Cell("eu2", dedicated=True))
    assert CELLS.read({}) == (Cell("cell1"),)
    for bad in ("big:dedicated,cell2", "cell1,cell1", "Cell1", "cell1:huge", "0"):
        with pytest.raises(SettingsError):
            CELLS.read({"CELLS": bad})


def test_a_service_refuses_to_start_without_a_dsn_for_each_other_cell() -> None:
    with pytest.raises(SettingsError, match="SITES_CELL_DATABASE_URLS"):
        _cell_database_urls("sites", {"CELLS": "2"})
    with pytest.raises(SettingsError, match="not in CELLS"):
        _cell_database_urls(
            "sites", {"CELLS": "2", "SITES_CELL_DATABASE_URLS": "cell2=postgresql://a cell3=postgresql://b"}
        )
    assert _cell_database_urls("sites", {"CELLS": "2", "SITES_CELL_DATABASE_URLS": "cell2=postgresql://a"}) == {
        "cell2": "postgresql://a"
    }
    assert _cell_database_urls("tenant", {"CELLS": "2"}) == {}  # the registry lives in the home cell only


def test_make_run_with_cells_2_gives_the_second_cell_a_server_of_its_own(tmp_path: Path) -> None:
    config = StackConfig.from_env(tmp_path, {"CELLS": "2", "PG_PORT": "55500"})
    assert [c.name for c in config.cells] == ["cell1", "cell2"]
    assert config.cell_pg_port("cell2") == 55501
    stack = Stack(config)
    assert stack.other_cells == ["cell2"]
    stack.cell_urls["cell2"] = "postgresql://postgres@127.0.0.1:55501/towerco"  # what start_cell records
    env = stack.service_env()
    assert env["CELLS"] == "cell1,cell2"
    assert env["AUDIT_CELL_DATABASE_URLS"].startswith("cell2=postgresql://audit_app:")
    assert "@127.0.0.1:55501/towerco" in env["AUDIT_CELL_DATABASE_URLS"]


def test_the_audit_retention_command_purges_old_events_in_every_cell(cells: CellsStack) -> None:
    tenant = cells.create_tenant(cell="cell2").tenant_id  # professional: audit events kept 365 days
    md = cells.token(tenant)
    _wait_for_event(cells.audit, md, "tenants.create")
    create_site(cells.sites, md, "kept")  # the newest event is always kept: a second one
    _wait_for_event(cells.audit, md, "sites.create")

    async def on_cell2(statement: str) -> Any:
        conn = await asyncpg.connect(cells.stack.cell_urls["cell2"])
        try:
            async with conn.transaction():  # past the log's append-only trigger, for this statement only
                await conn.execute("ALTER TABLE audit.events DISABLE TRIGGER events_append_only")
                found = await conn.fetchval(statement, tenant)
                await conn.execute("ALTER TABLE audit.events ENABLE ALWAYS TRIGGER events_append_only")
            return found
        finally:
            await conn.close()

    first = "(SELECT min(sequence) FROM audit.events WHERE tenant_id = $1)"
    asyncio.run(
        on_cell2(
            "UPDATE audit.events SET create_time = now() - interval '400 days' "
            f"WHERE tenant_id = $1 AND sequence = {first} RETURNING sequence"
        )
    )
    command = [sys.executable, "-m", "services.audit", "retention"]
    done = subprocess.run(command, cwd=REPO, env=cells.stack.service_env(), capture_output=True, timeout=60)
    output = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, output
    assert f"removed 1 older than 365 days for tenant {tenant}" in output
    assert asyncio.run(on_cell2(f"SELECT {first}")) == 2


# Last: it stops and restarts a server the tests above use.
def test_cell2_stopped_leaves_cell1_tenants_served_and_cell2_tenants_unavailable_until_it_is_back(
    cells: CellsStack,
) -> None:
    on_cell1 = cells.create_tenant(cell="cell1")
    on_cell2 = cells.create_tenant(cell="cell2")
    md1, md2 = cells.token(on_cell1.tenant_id), cells.token(on_cell2.tenant_id)
    create_site(cells.sites, md2, "before-stop")
    port = str(cells.stack.config.cell_pg_port("cell2"))
    cells.stack.stop_cell("cell2")
    try:
        create_site(cells.sites, md1, "while-cell2-is-down")
        assert len(cells.sites.ListSites(sites_pb.ListSitesRequest(), metadata=md1, timeout=10).sites) == 1
        for _ in range(2):  # the broken pooled connections, then a new one refused
            error = expect_error(cells.sites.ListSites, sites_pb.ListSitesRequest(), metadata=md2)
            assert error.code == grpc.StatusCode.UNAVAILABLE, error
            # The sites service's own read, or (once its cached entitlements lapse) the feature gate's.
            assert error.reason in ("DATABASE_UNAVAILABLE", "ENTITLEMENTS_UNAVAILABLE"), error
            assert error.retry is not None
            for secret in ("cell2", port, "127.0.0.1", "localhost"):
                assert secret not in error.message, error.message
        # A sites process started while cell2 is down starts, serves cell1, and refuses cell2's tenant.
        log_path = OUTPUT / "logs" / "cells-sites-restarted.log"
        with log_path.open("wb") as log:
            cells.stack.stop("sites")
            cells.stack.start_service("sites", log=log)
            cells.stack.wait_serving("sites")
        create_site(cells.sites, md1, "after-sites-restart")
        error = expect_error(cells.sites.ListSites, sites_pb.ListSitesRequest(), metadata=md2)
        assert error.code == grpc.StatusCode.UNAVAILABLE, error
    finally:
        cells.stack.start_cell("cell2")
    deadline = time.monotonic() + 20
    while True:
        try:
            listed = cells.sites.ListSites(sites_pb.ListSitesRequest(), metadata=md2, timeout=10).sites
            break
        except grpc.RpcError as exc:
            if time.monotonic() > deadline or exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            time.sleep(0.2)
    assert [s.site_id for s in listed] == ["before-stop"]
    create_site(cells.sites, md2, "after-restart")
    # Served only once the isolation guard it could not run at start-up has passed there.
    assert "cell cell2 answers and passed the isolation guard" in log_path.read_text()
