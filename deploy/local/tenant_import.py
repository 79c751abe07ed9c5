"""``make tenant-import``: an export file written back as a tenant, all or nothing.

The import checks the whole file first (``tenant_archive.load``: digest, counts, audit
chain), then writes every row under the target tenant id: in **one transaction** when the
tenant goes to the home cell; into another cell, the registry's rows held uncommitted while
the cell's transaction writes and commits, then the registry's, and the cell's rows removed
again if that last commit fails. It refuses a target id the registry knows (a tombstone
too) or that any table holds a row of, a file written at other schema versions, a host
another tenant routes, and a placement CreateTenant would refuse. The tenant is created by
the import (its registry row is in the file; a tenant provisioned beforehand is never
empty); its sealed secrets are resealed for the new id, its audit events re-linked under
it (the hash covers the tenant id), its ``cell`` set to where its rows went, and a
``tenants.import`` event closes its chain. The caller then publishes it to every
service's tenant cache (:func:`publish_tenant`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg

from services.audit import queries as audit_queries
from services.runtime.cells import Cell, placement_problem
from services.runtime.context import is_valid_tenant_id
from services.runtime.faults import Faults
from services.runtime.plans import Plans
from services.runtime.tenant_cache import TenantCache
from services.tenant import records, tenant_settings_store
from services.tenant.hosts import RESERVED_TENANT_IDS
from services.tenant.secrets import SecretBox
from services.tenant.tenant_move import columns as table_columns

from .tenant_archive import AUDIT_EVENTS, TenantArchive, rechain
from .tenant_transfer import (
    EXPORTED,
    PLAN_TABLE,
    REGISTRY_TABLE,
    Table,
    TransferError,
    append_event,
    as_json,
    cell_tables,
    compact_json,
    registry_tables,
    require_versions,
    tenant_tables,
    utc,
)

NO_FAULTS = Faults("")
_SETTINGS = "tenant.tenant_settings"
log = logging.getLogger("towerco.tenant_import")


async def import_tenant(
    conn: asyncpg.Connection[Any],
    archive: TenantArchive,
    target: str,
    box: SecretBox,
    *,
    cell_conn: asyncpg.Connection[Any] | None = None,
    placement: str | None = None,
    faults: Faults = NO_FAULTS,
) -> dict[str, int]:
    """Write ``archive`` (already checked by ``tenant_archive.load``) as tenant ``target``, all or nothing.

    ``conn`` is the home cell's database (the registry); ``cell_conn`` the database of the
    cell the tenant goes to, when that is another one, and ``placement`` that cell's name,
    recorded on the tenant (None: the home cell). In one database everything is one
    transaction. Across two, the registry's rows are written first and held uncommitted
    while the cell's transaction writes and commits; the registry's commits last, and if
    it fails the cell's rows are removed again. Until the registry's commit no service
    knows the tenant, so no call sees it half-imported.

    Returns the rows written per table. TransferError, with nothing written, if the target
    is not empty, the schema versions differ, or a row cannot be written.
    """
    if not is_valid_tenant_id(target) or target in RESERVED_TENANT_IDS:
        raise TransferError(f"{target!r} cannot be a tenant id (reserved, or not of the tenant id pattern)")
    cell = cell_conn or conn
    if cell is not conn and not placement:
        raise TransferError("an import into another cell's database needs that cell's name (--cell)")
    await utc(conn, cell)
    rows = {table.name: _for_target(table.name, archive.tables.get(table.name, []), archive.tenant_id, target, box)
            for table in EXPORTED}  # fmt: skip
    for row in rows[REGISTRY_TABLE]:
        row["cell"] = placement  # where this import puts its rows, whatever the source's was
    written: dict[str, int] = {}
    cell_committed = False
    try:
        async with conn.transaction():
            await _prepare(conn, archive, target, "this database" if cell is conn else "the home cell")
            await _write(conn, rows, registry_tables() if cell is not conn else EXPORTED, written)
            if cell is conn:
                await _record_import(conn, archive, target)
                faults.check("tenant_import.before_commit")
            else:
                async with cell.transaction():
                    await _prepare(cell, archive, target, "the tenant's cell")
                    await _write(cell, rows, cell_tables(), written)
                    await _record_import(cell, archive, target)
                    faults.check("tenant_import.before_cell_commit")
                cell_committed = True
                faults.check("tenant_import.before_registry_commit")
    except BaseException:
        if cell_committed:
            await _remove_cell_rows(cell, target)
        raise
    return written


def check_placement(archive: TenantArchive, placement: str | None, cells: Sequence[Cell], plans: Plans) -> None:
    """The rules CreateTenant places by: a plan this platform has, and a cell it may go to."""
    rows = archive.tables.get(PLAN_TABLE) or archive.tables.get(REGISTRY_TABLE) or [{}]
    plan = str(rows[0].get("plan", ""))  # the feature gate's: the plan the tenant is on now
    if plans.get(plan) is None:
        raise TransferError(f"the file's tenant is on plan {plan!r}, which this platform's plans file does not have")
    problem = placement_problem(cells, placement, plan, plans) if placement else None
    if problem:
        raise TransferError(f"cell {placement!r}: {problem}")


async def _prepare(conn: asyncpg.Connection[Any], archive: TenantArchive, target: str, where: str) -> None:
    """Lock the target id in this database, then refuse other schema versions and a used id."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('tenant-import/' || $1))", target)
    await conn.execute(audit_queries.LOCK_CHAIN, target)  # no audit writer appends meanwhile
    await require_versions(conn, archive.schema_versions, where)
    await _require_empty(conn, target)


async def _write(
    conn: asyncpg.Connection[Any],
    rows: dict[str, list[dict[str, Any]]],
    tables: Iterable[Table],
    written: dict[str, int],
) -> None:
    for table in tables:
        if not rows[table.name]:
            continue
        if table.name == "tenant.host_routes":
            await _require_free_hosts(conn, [row["host"] for row in rows[table.name]])
        columns = ", ".join(await table_columns(conn, table.name))
        try:
            status = await conn.execute(
                f"INSERT INTO {table.name} ({columns}) SELECT {columns}"
                f" FROM jsonb_populate_recordset(NULL::{table.name}, $1::jsonb)",
                compact_json(rows[table.name]),
            )
        except asyncpg.PostgresError as exc:  # the transaction rolls back: nothing stays
            raise TransferError(f"the rows of {table.name} could not be written ({exc})") from None
        written[table.name] = int(status.rsplit(" ", 1)[1])


async def _record_import(conn: asyncpg.Connection[Any], archive: TenantArchive, target: str) -> None:
    """``tenants.import`` closes the new chain, pointing at the file and the chain it came from."""
    head = archive.events()[-1]["hash"] if archive.events() else ""
    details = {"source_tenant_id": archive.tenant_id, "sha256": archive.sha256, "source_chain_head": head}
    await append_event(conn, target, "tenants.import", {**details, "rows": archive.row_count})


async def _remove_cell_rows(conn: asyncpg.Connection[Any], target: str) -> None:
    """Undo a committed cell part whose registry part failed: the id holds nothing again."""
    try:
        async with conn.transaction():
            # Audit events are append-only but for the retention role (its policy and trigger).
            await conn.execute("SET LOCAL ROLE audit_retention")
            await conn.execute("DELETE FROM audit.events WHERE tenant_id = $1", target)
            await conn.execute("RESET ROLE")
            for table in reversed(cell_tables()):
                if table.name != AUDIT_EVENTS:
                    await conn.execute(f"DELETE FROM {table.name} WHERE tenant_id = $1", target)
    except (asyncpg.PostgresError, OSError) as exc:
        raise TransferError(
            f"the registry's part failed after the cell's was committed, and removing the cell's rows of {target!r} "
            f"failed too ({exc}): delete them by hand (as audit_retention for audit.events) before importing again"
        ) from exc
    log.warning("import of %s: the registry's part failed; the cell's rows were removed again", target)


def _for_target(
    table: str, rows: list[dict[str, Any]], source: str, target: str, box: SecretBox
) -> list[dict[str, Any]]:
    if table == AUDIT_EVENTS:
        return rechain(rows, target)
    mapped = [{**row, "tenant_id": target} for row in rows]
    if table == _SETTINGS and source != target:
        for row in mapped:
            row["document"] = tenant_settings_store.reseal(row["document"], box, source, target)
    return mapped


async def _require_empty(conn: asyncpg.Connection[Any], target: str) -> None:
    held = []
    for table in await tenant_tables(conn):
        if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table} WHERE tenant_id = $1)", target):
            held.append(table)
    if held:
        raise TransferError(
            f"tenant id {target!r} is not empty: {', '.join(held)} hold its rows (a tombstone counts: "
            "the id is free again once the registry removes it); import into an id that was never used"
        )


async def _require_free_hosts(conn: asyncpg.Connection[Any], hosts: list[str]) -> None:
    taken = await conn.fetch(
        "SELECT host, tenant_id FROM tenant.host_routes WHERE host = ANY($1::text[]) ORDER BY host", hosts
    )
    if taken:
        listed = ", ".join(f"{row['host']} ({row['tenant_id']})" for row in taken)
        raise TransferError(f"host names of the file already route to other tenants: {listed}; remove them first")


async def publish_tenant(conn: asyncpg.Connection[Any], cache: TenantCache, tenant_id: str) -> None:
    """Announce the imported tenant to every service's cache, as the registry announces a change."""
    row = await conn.fetchrow(
        "SELECT t.*, ARRAY(SELECT host FROM tenant.host_routes h WHERE h.tenant_id = t.tenant_id) AS domains"
        " FROM tenant.tenants t WHERE t.tenant_id = $1",
        tenant_id,
    )
    document = await conn.fetchval("SELECT document FROM tenant.tenant_settings WHERE tenant_id = $1", tenant_id)
    assert row is not None
    await records.publish(cache, row, as_json(document) if document is not None else None)
