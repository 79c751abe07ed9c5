"""Per-tenant export and import: ``make tenant-export`` / ``make tenant-import`` (deploy/local/tenant_*.py).

The file's own checks run without a server on a chain made here; the round trip runs
against the session's stack: a tenant with sites, settings holding a secret, overrides and
its audit log, exported by the command, imported under a new id, compared table by table
on the database and used through the services' APIs.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
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

from deploy.local.stack import Stack, service_spec
from deploy.local.tenant_archive import ArchiveError, TenantArchive, check_chain, dump, load, rechain
from deploy.local.tenant_commands import dev_cell_urls, import_from_file
from deploy.local.tenant_import import check_placement, import_tenant
from deploy.local.tenant_transfer import (
    EXPORTED,
    LEFT_OUT,
    TransferError,
    export_tenant,
    missing_from_lists,
    tenant_tables,
)
from deploy.local.tokens import mint
from services.audit.hash_chain import ChainedEvent
from services.runtime.cells import Cell
from services.runtime.faults import Faults, InjectedFaultError
from services.runtime.plans import load_plans
from services.runtime.server import migrate_service
from services.tenant.secrets import SecretBox, load_secret_box

from .support.cells_stack import CellsStack
from .support.errors import expect_error
from .support.metadata import bearer
from .support.requests import create_site
from .test_cells import _rows_of
from .test_cells import cells as cells

REPO = Path(__file__).resolve().parents[1]
SITES = 30
API_KEY = "pager-key-0123456789"


# --- The file's checks, on a chain made here (no server) ---------------------------------


def _chain(tenant_id: str, count: int) -> list[dict[str, Any]]:
    """``count`` events of ``tenant_id`` as an export holds them, correctly chained."""
    start = datetime(2026, 11, 1, tzinfo=UTC)
    rows = [
        {
            "tenant_id": tenant_id, "sequence": n, "event_id": str(uuid.UUID(int=n)), "user_id": "u1",
            "action": f"sites.create.{n}", "resource": f"sites/s{n}", "details": {"n": n, "ratio": 0.5},
            "ip_address": "", "request_id": f"r{n}", "outcome": "OK",
            "create_time": (start + timedelta(seconds=n)).isoformat(), "prev_hash": "", "hash": "",
        }
        for n in range(1, count + 1)
    ]  # fmt: skip
    return rechain(rows, tenant_id)


def _archive(events: list[dict[str, Any]]) -> TenantArchive:
    tenant = {"tenant_id": "t_file", "display_name": "File"}
    return TenantArchive(
        tenant_id="t_file",
        export_time="2026-11-30T10:00:00.000000Z",
        schema_versions={"audit": 1, "sites": 3},
        tables={"tenant.tenants": [tenant], "audit.events": events},
    )


def _rewrite(data: bytes, edit: Callable[[list[dict[str, Any]]], None]) -> bytes:
    """``data`` with its row lines edited and the header counts and trailer digest made to match."""
    lines = [json.loads(line) for line in data.splitlines()]
    header, rows = lines[0], lines[1:-1]
    edit(rows)
    events = [r["row"] for r in rows if r["table"] == "audit.events"]
    header["tables"]["audit.events"] = len(events)
    head = events[-1]
    header["audit_chain"] = {"events": len(events), "head_sequence": head["sequence"], "head_hash": head["hash"]}
    body = b"".join(json.dumps(v, sort_keys=True, separators=(",", ":")).encode() + b"\n" for v in [header, *rows])
    trailer = {"end": True, "rows": len(rows), "sha256": hashlib.sha256(body).hexdigest()}
    return body + json.dumps(trailer).encode() + b"\n"


def test_a_file_reads_back_as_written_and_its_chain_verifies() -> None:
    archive = _archive(_chain("t_file", 5))
    again = load(dump(archive))
    assert again.tables == archive.tables and again.sha256 == archive.sha256
    assert again.schema_versions == archive.schema_versions


def test_rechaining_under_the_same_tenant_keeps_every_hash() -> None:
    events = _chain("t_file", 4)
    assert rechain(events, "t_file") == events
    moved = rechain(events, "t_other")
    assert [e["hash"] for e in moved] != [e["hash"] for e in events]
    for m in moved:
        assert (
            ChainedEvent(**{**m, "create_time": datetime.fromisoformat(m["create_time"])}).compute_hash() == m["hash"]
        )


def test_a_chain_trimmed_by_retention_travels_and_is_relinked_from_its_trusted_start() -> None:
    # Retention purged events 1-4: the first left keeps its predecessor's hash as the chain's start.
    events = _chain("t_file", 8)[4:]
    assert load(dump(_archive(events))).events() == events
    moved = rechain(events, "t_other")
    assert moved[0]["prev_hash"] == events[0]["prev_hash"] != "" and check_chain(moved).valid
    assert [e["sequence"] for e in moved] == [5, 6, 7, 8]


def _edit_event(rows: list[dict[str, Any]]) -> None:
    rows[3]["row"]["action"] = "sites.delete"


def _remove_event(rows: list[dict[str, Any]]) -> None:
    del rows[3]


def _reorder_events(rows: list[dict[str, Any]]) -> None:
    rows[2], rows[3] = rows[3], rows[2]


@pytest.mark.parametrize(
    "tamper", [_edit_event, _remove_event, _reorder_events], ids=["edited", "removed", "reordered"]
)
def test_a_file_whose_chain_was_tampered_with_is_refused(tamper: Callable[[list[dict[str, Any]]], None]) -> None:
    # The digest is recomputed: only the chain can tell.
    tampered = _rewrite(dump(_archive(_chain("t_file", 6))), tamper)
    with pytest.raises(ArchiveError, match="the audit chain does not verify"):
        load(tampered)


def test_a_damaged_or_truncated_file_is_refused() -> None:
    data = dump(_archive(_chain("t_file", 3)))
    with pytest.raises(ArchiveError, match="SHA-256 does not match"):
        load(data.replace(b'"File"', b'"Fake"'))
    with pytest.raises(ArchiveError, match=r"ends before its trailer|last line is not the trailer"):
        load(b"\n".join(data.splitlines()[:-1]) + b"\n")


# --- Against the session's stack ---------------------------------------------------------


async def _settled(admin: asyncpg.Connection[Any], tenant_id: str) -> int:
    """Wait until the tenant's audit events have all reached its chain; its event count."""
    outboxes = " + ".join(
        f"(SELECT count(*) FROM {schema}.audit_outbox WHERE tenant_id = $1)"
        for schema in ("tenant", "sites", "features")
    )
    for _ in range(200):
        if await admin.fetchval(f"SELECT {outboxes}", tenant_id) == 0:
            count: int = await admin.fetchval("SELECT count(*) FROM audit.events WHERE tenant_id = $1", tenant_id)
            return count
        await asyncio.sleep(0.05)
    raise AssertionError(f"tenant {tenant_id}'s audit events never reached the log")


async def _rows(
    admin: asyncpg.Connection[Any], tenant_id: str, box: SecretBox, cell: asyncpg.Connection[Any] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Every exported table's rows of ``tenant_id``, its id written as ``T``; secrets opened, hashes dropped.

    The registry's tables are read from ``admin``, the others from ``cell`` when given.
    """
    found: dict[str, list[dict[str, Any]]] = {}
    for table in EXPORTED:
        conn = cell if cell is not None and not table.name.startswith("tenant.") else admin
        order = ", ".join(table.order)
        rows = [
            {**json.loads(r["row"]), "tenant_id": "T"}
            for r in await conn.fetch(
                f"SELECT to_jsonb(t)::text AS row FROM {table.name} t WHERE tenant_id = $1 ORDER BY {order}", tenant_id
            )
        ]
        for row in rows:
            if table.name == "tenant.tenants":  # where the import put it, not where the source is: checked apart
                row.pop("cell")
            if table.name == "tenant.tenant_settings":  # sealed for its own tenant: compare what they hold
                secrets = row["document"]["secrets"]
                row["document"]["secrets"] = {
                    path: box.open(sealed, f"{tenant_id}/integrations.{path}") for path, sealed in secrets.items()
                }
            if table.name == "audit.events":  # the hash covers the tenant id: re-linked under the new one
                row.pop("hash")
                row.pop("prev_hash")
        found[table.name] = rows
    return found


async def _holdings(admin: asyncpg.Connection[Any], tenant_id: str) -> list[str]:
    """The tables holding any row of ``tenant_id``."""
    return [
        table
        for table in await tenant_tables(admin)
        if await admin.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table} WHERE tenant_id = $1)", tenant_id)
    ]


def _command(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.local", *args, "--database-url", stack.database_url],
        env=stack.service_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def box(stack: Stack) -> SecretBox:
    return load_secret_box(stack.service_env())


@pytest.fixture
def busy_tenant(new_tenant, token, registry, sites, features, platform_token: str) -> str:
    """A tenant with sites, settings holding a secret, a feature and a limit override, and their audit events."""
    tenant_id: str = new_tenant("ex")
    md = bearer(token(tenant_id))
    for n in range(SITES):
        create_site(sites, md, f"EX-{n:04d}", name=f"Tower {n}")
    sites.UpdateSite(
        sites_pb.UpdateSiteRequest(
            site=sites_pb.Site(site_id="EX-0001", location=sites_pb.Location(region="north", latitude=1.5)),
            update_mask=field_mask_pb2.FieldMask(paths=["location"]),
        ),
        metadata=md,
        timeout=10,
    )
    settings = registry.GetTenantSettings(tenant_pb.GetTenantSettingsRequest(), metadata=md, timeout=10)
    settings.integrations.api_keys["pager"] = API_KEY
    request = tenant_pb.UpdateTenantSettingsRequest(settings=settings)
    request.update_mask.paths.append("integrations.api_keys")
    registry.UpdateTenantSettings(request, metadata=md, timeout=10)
    admin_md = bearer(platform_token)
    features.SetFeatureOverride(
        features_pb.SetFeatureOverrideRequest(tenant_id=tenant_id, feature="advanced_analytics", enabled=True),
        metadata=admin_md,
        timeout=10,
    )
    features.SetLimitOverride(
        features_pb.SetLimitOverrideRequest(tenant_id=tenant_id, resource="max_sites", limit=5000),
        metadata=admin_md,
        timeout=10,
    )
    return tenant_id


async def test_export_then_import_under_a_new_id_reproduces_every_row(
    stack: Stack, admin: asyncpg.Connection[Any], busy_tenant: str, box: SecretBox, tmp_path: Path,
    eventually, sites, registry, audit, platform_token: str,
) -> None:  # fmt: skip
    source, target = busy_tenant, f"im_{uuid.uuid4().hex[:10]}"
    events = await _settled(admin, source)
    before = await _rows(admin, source, box)
    assert (
        len(before["sites.sites"]) == SITES and before["features.limit_overrides"] and before["tenant.tenant_settings"]
    )
    assert len(before["audit.events"]) == events >= SITES

    file = tmp_path / "export.jsonl"
    exported = _command(stack, "tenant-export", "--tenant", source, "--out", str(file))
    assert exported.returncode == 0, exported.stderr
    # The export is audited in the source's own chain, after what the file holds.
    last = await admin.fetchrow(
        "SELECT action, details FROM audit.events WHERE tenant_id = $1 ORDER BY sequence DESC LIMIT 1", source
    )
    assert (
        last is not None
        and last["action"] == "tenants.export"
        and json.loads(last["details"])["sha256"] in exported.stderr
    )

    # A service asked about the id before it existed: it remembers the answer, until the import announces it.
    md = bearer(mint(stack.keys_dir, tenant=target, role="admin", ttl=600))
    unknown = expect_error(sites.ListSites, sites_pb.ListSitesRequest(), metadata=md)
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.PERMISSION_DENIED, "TENANT_UNKNOWN"), unknown

    written, untold = await import_from_file(stack.database_url, stack.redis_url, file.read_bytes(), target, box)
    assert untold == ""  # announced to the services' caches like any tenant change
    assert written["sites.sites"] == SITES and written["audit.events"] == events

    after = await _rows(admin, target, box)
    imported_event = after["audit.events"].pop()
    assert after == before  # every row of every exported table, tenant ids mapped, secrets as they were
    assert imported_event["action"] == "tenants.import"
    assert imported_event["details"]["source_tenant_id"] == source
    assert await admin.fetchval("SELECT cell FROM tenant.tenants WHERE tenant_id = $1", target) is None  # home
    assert before["tenant.tenant_settings"][0]["document"]["secrets"]["api_keys.pager"] == API_KEY

    # The services serve the new tenant at once: its sites, its settings (the secret masked), a chain that verifies.
    listed = eventually(lambda: sites.ListSites(sites_pb.ListSitesRequest(page_size=100), metadata=md, timeout=10))
    assert sorted(s.site_id for s in listed.sites) == [f"EX-{n:04d}" for n in range(SITES)]
    assert sites.GetSite(sites_pb.GetSiteRequest(site_id="EX-0001"), metadata=md, timeout=10).location.region == "north"
    settings = registry.GetTenantSettings(tenant_pb.GetTenantSettingsRequest(), metadata=md, timeout=10)
    assert "pager" in settings.integrations.api_keys
    verified = audit.VerifyChain(
        audit_pb.VerifyChainRequest(tenant_id=target), metadata=bearer(platform_token), timeout=10
    )
    assert verified.valid and verified.events_checked >= events + 1


async def test_an_import_into_a_tenant_id_in_use_is_refused_and_writes_nothing(
    admin: asyncpg.Connection[Any],
    busy_tenant: str,
    box: SecretBox,
    new_tenant,
) -> None:
    await _settled(admin, busy_tenant)
    archive = load(dump(await export_tenant(admin, busy_tenant)))
    used: str = new_tenant("used")
    await _settled(admin, used)
    held = await _holdings(admin, used)
    with pytest.raises(TransferError, match=f"tenant id '{used}' is not empty"):
        await import_tenant(admin, archive, used, box)
    assert await _holdings(admin, used) == held
    assert await admin.fetchval("SELECT count(*) FROM sites.sites WHERE tenant_id = $1", used) == 0


async def test_an_import_failing_half_way_leaves_nothing_of_the_target(
    admin: asyncpg.Connection[Any],
    new_tenant,
    box: SecretBox,
) -> None:
    # The source routes a host; imported under a new id while the source still has it, the
    # host_routes part fails after the registry row, settings and users were written.
    source: str = new_tenant("hr", domains=[f"noc-{uuid.uuid4().hex[:8]}.example.com"])
    await _settled(admin, source)
    archive = load(dump(await export_tenant(admin, source)))
    target = f"hr_{uuid.uuid4().hex[:10]}"
    with pytest.raises(TransferError, match="host names of the file already route to other tenants"):
        await import_tenant(admin, archive, target, box)
    assert await _holdings(admin, target) == []


def test_the_command_refuses_a_tampered_export_with_a_clear_message(
    stack: Stack,
    busy_tenant: str,
    tmp_path: Path,
    eventually,
) -> None:
    file = tmp_path / "export.jsonl"
    exported = _command(stack, "tenant-export", "--tenant", busy_tenant, "--out", str(file))
    assert exported.returncode == 0, exported.stderr
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_bytes(_rewrite(file.read_bytes(), _edit_audit_action))
    target = f"tm_{uuid.uuid4().hex[:10]}"
    refused = _command(stack, "tenant-import", "--file", str(tampered), "--tenant", target, "--redis-url", "")
    assert refused.returncode == 1
    assert "the audit chain does not verify" in refused.stderr and "nothing was imported" in refused.stderr

    async def holdings() -> list[str]:
        conn: asyncpg.Connection[Any] = await asyncpg.connect(stack.database_url)
        try:
            return await _holdings(conn, target)
        finally:
            await conn.close()

    assert asyncio.run(holdings()) == []


def _edit_audit_action(rows: list[dict[str, Any]]) -> None:
    first = next(r for r in rows if r["table"] == "audit.events")
    first["row"]["outcome"] = "PERMISSION_DENIED"


async def test_every_table_with_tenant_rows_is_exported_or_left_out_with_a_reason(
    admin: asyncpg.Connection[Any],
) -> None:
    tables = await tenant_tables(admin)
    missing = missing_from_lists(tables)
    assert missing == [], f"{missing}: add them to EXPORTED, or to LEFT_OUT with the reason"
    assert {t.name for t in EXPORTED} | set(LEFT_OUT) == set(tables), "a listed table no longer exists"


# --- Two databases: the registry in the home cell, the tenant's rows in another --------


@pytest.fixture
async def other_cell(admin: asyncpg.Connection[Any], admin_dsn: str) -> AsyncIterator[asyncpg.Connection[Any]]:
    """A second database on the session's server, with every service's schema, as a cell's."""
    name = f"cell_{uuid.uuid4().hex[:8]}"
    await admin.execute(f"CREATE DATABASE {name}")
    dsn = admin_dsn.rsplit("/", 1)[0] + f"/{name}"
    try:
        for service in ("tenant", "sites", "features", "audit"):
            await migrate_service(service_spec(service), dsn, None)
        conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn)
        try:
            yield conn
        finally:
            await conn.close()
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


async def test_an_import_into_another_cell_writes_the_registry_at_home_and_the_rest_in_the_cell(
    admin: asyncpg.Connection[Any], other_cell: asyncpg.Connection[Any], busy_tenant: str, box: SecretBox
) -> None:
    await _settled(admin, busy_tenant)
    before = await _rows(admin, busy_tenant, box)
    archive = load(dump(await export_tenant(admin, busy_tenant)))
    target = f"ic_{uuid.uuid4().hex[:10]}"

    with pytest.raises(TransferError, match="needs that cell's name"):
        await import_tenant(admin, archive, target, box, cell_conn=other_cell)
    await import_tenant(admin, archive, target, box, cell_conn=other_cell, placement="cell2")
    assert await admin.fetchval("SELECT cell FROM tenant.tenants WHERE tenant_id = $1", target) == "cell2"
    at_home, in_cell = await _holdings(admin, target), await _holdings(other_cell, target)
    assert "tenant.tenants" in at_home and all(t.startswith("tenant.") for t in at_home), at_home
    assert "sites.sites" in in_cell and all(not t.startswith("tenant.") for t in in_cell), in_cell
    after = await _rows(admin, target, box, other_cell)
    assert after["audit.events"].pop()["action"] == "tenants.import"
    assert after == before
    assert check_chain([json.loads(r["row"]) for r in await other_cell.fetch(
        "SELECT to_jsonb(e)::text AS row FROM audit.events e WHERE tenant_id = $1 ORDER BY sequence", target
    )]).valid  # fmt: skip

    # Out of the home cell alone it would miss the rows: refused, naming the way.
    with pytest.raises(TransferError, match="rows are not in this database: it is placed in another cell"):
        await export_tenant(admin, target)
    # And out again from the two databases: the same rows, the chain verifying in the file.
    again = load(dump(await export_tenant(admin, target, other_cell)))
    assert again.tables["sites.sites"] == [{**r, "tenant_id": target} for r in archive.tables["sites.sites"]]
    assert len(again.events()) == len(archive.events()) + 1


async def test_an_import_whose_registry_part_fails_after_the_cells_commit_leaves_nothing_in_either(
    admin: asyncpg.Connection[Any], other_cell: asyncpg.Connection[Any], busy_tenant: str, box: SecretBox
) -> None:
    await _settled(admin, busy_tenant)
    archive = load(dump(await export_tenant(admin, busy_tenant)))
    target = f"if_{uuid.uuid4().hex[:10]}"
    with pytest.raises(InjectedFaultError):
        await import_tenant(
            admin, archive, target, box, cell_conn=other_cell, placement="cell2",
            faults=Faults("tenant_import.before_registry_commit"),
        )  # fmt: skip
    assert await _holdings(admin, target) == []
    assert await _holdings(other_cell, target) == []  # its audit events too, removed as audit_retention


def test_the_dev_stack_names_each_cells_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELLS", "2")
    monkeypatch.setenv("PG_PORT", "15432")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert dev_cell_urls() == {
        "cell1": "postgresql://postgres@127.0.0.1:15432/towerco",
        "cell2": "postgresql://postgres@127.0.0.1:15433/towerco",
    }


def test_an_import_is_placed_by_the_rules_create_tenant_places_by() -> None:
    plans, platform = load_plans(), (Cell("cell1"), Cell("big", dedicated=True))
    archive = _archive([])
    archive.tables["features.tenant_plans"] = [{"tenant_id": "t_file", "plan": "professional"}]
    check_placement(archive, None, platform, plans)
    check_placement(archive, "cell1", platform, plans)
    with pytest.raises(TransferError, match="'big' is a dedicated cell; plan 'professional' never has one"):
        check_placement(archive, "big", platform, plans)
    with pytest.raises(TransferError, match="must be one of the platform's cells: cell1, big"):
        check_placement(archive, "cell9", platform, plans)
    archive.tables["features.tenant_plans"][0]["plan"] = "gold"
    with pytest.raises(TransferError, match="plan 'gold', which this platform's plans file does not have"):
        check_placement(archive, None, platform, plans)


# --- A stack of three cells (tests/test_cells.py's): placed, exported, imported, served ---


def test_a_cell2_tenant_imported_into_cell1_is_served_from_cell1(cells: CellsStack, tmp_path: Path) -> None:
    source = cells.create_tenant(cell="cell2").tenant_id
    md = cells.token(source)
    for n in range(5):
        create_site(cells.sites, md, f"CX-{n}")
    stack, home, cell2 = cells.stack, cells.stack.database_url, cells.stack.cell_urls["cell2"]

    async def settled() -> None:  # the sites' audit events are in the chain on cell2
        conn: asyncpg.Connection[Any] = await asyncpg.connect(cell2)
        try:
            for _ in range(200):
                if await conn.fetchval("SELECT count(*) FROM sites.audit_outbox WHERE tenant_id = $1", source) == 0:
                    return
                await asyncio.sleep(0.05)
        finally:
            await conn.close()

    asyncio.run(settled())
    file = tmp_path / "cell2.jsonl"
    run = functools.partial(_run, stack.service_env())
    exported = run("tenant-export", "--tenant", source, "--out", str(file), "--database-url", home)
    assert exported.returncode == 1 and "placed in another cell" in exported.stderr  # not from the home cell alone
    exported = run(
        "tenant-export", "--tenant", source, "--out", str(file), "--database-url", home, "--cell-database-url", cell2
    )
    assert exported.returncode == 0, exported.stderr

    target = f"cx_{uuid.uuid4().hex[:10]}"
    dedicated = run("tenant-import", "--file", str(file), "--tenant", target, "--cell", "cell3", "--database-url", home,
                    "--cell-database-url", stack.cell_urls["cell3"], "--redis-url", "")  # fmt: skip
    assert dedicated.returncode == 1 and "'cell3' is a dedicated cell" in dedicated.stderr, dedicated.stderr
    imported = run("tenant-import", "--file", str(file), "--tenant", target, "--cell", "cell1", "--database-url", home,
                   "--redis-url", stack.redis_url)  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    listed = cells.sites.ListSites(sites_pb.ListSitesRequest(page_size=10), metadata=cells.token(target), timeout=10)
    assert sorted(s.site_id for s in listed.sites) == [f"CX-{n}" for n in range(5)]
    verified = cells.audit.VerifyChain(
        audit_pb.VerifyChainRequest(tenant_id=target), metadata=bearer(cells.platform), timeout=10
    )
    assert verified.valid and verified.events_checked >= 6
    assert _rows_of(home, target)["sites.sites"] == 5
    assert not any(_rows_of(cell2, target).values())


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.local", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
