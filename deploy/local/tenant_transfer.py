"""``make tenant-export`` / ``make tenant-import``: one tenant's rows of every service, out to a file and back.

Both run against the database that holds the tenant (a cell: every service's schema in one
PostgreSQL database) with its administrative DSN, the one migrations run with:

- **Export** reads every table of :data:`EXPORTED` for the tenant in one REPEATABLE READ
  snapshot, so the file is one moment of the tenant across all services; refuses a tenant
  that is not ACTIVE or SUSPENDED, or whose audit chain does not verify; then appends a
  ``tenants.export`` event to the tenant's own chain, naming the file's digest.
- **Import** checks the whole file first (``tenant_archive.load``: digest, counts, audit
  chain), then writes every row under the target tenant id in **one transaction**: it
  refuses a target id the registry knows (a tombstone too) or that any table holds a row
  of, a file written at other schema versions, or a host another tenant routes; on any
  failure nothing is written. The tenant is created by the import (its registry row is in
  the file); its sealed secrets are resealed for the new id, its audit events re-linked
  under it (the hash covers the tenant id), and a ``tenants.import`` event closes its
  chain. The change is then published to every service's tenant cache.

Why the database and not the services' TenantDataService: that saga copies between two
tenants of one database and streams nothing out or in; and an import must be all or
nothing across four schemas, while the audit log is append-only for the services' roles,
so a service-by-service import could not be undone once its audit part was written. One
transaction on the cell's database is atomic by construction. Every statement names the
one tenant it reads or writes (``WHERE tenant_id = $1``); identifiers come from
:data:`EXPORTED` only.
"""

from __future__ import annotations

import getpass
import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from services.audit import queries as audit_queries
from services.audit.hash_chain import ChainedEvent, rfc3339
from services.runtime.cells import Cell, placement_problem
from services.runtime.context import is_valid_tenant_id
from services.runtime.faults import Faults
from services.runtime.plans import Plans
from services.runtime.tenant_cache import TenantCache
from services.tenant import records, tenant_settings_store
from services.tenant.hosts import RESERVED_TENANT_IDS
from services.tenant.secrets import SecretBox

from .tenant_archive import AUDIT_EVENTS, TenantArchive, check_chain, rechain


@dataclass(frozen=True)
class Table:
    """A table an export carries: ``schema.table`` and the columns that order its rows."""

    name: str
    order: tuple[str, ...]


#: The tenant's record; ``cell`` on it says which cell holds its other rows (NULL: the home cell).
REGISTRY_TABLE = "tenant.tenants"
#: The services whose schemas hold tenant rows; a file records their schema versions.
SERVICES = ("tenant", "sites", "features", "audit")

#: What an export carries, in the order an import writes it (foreign keys' parents first).
EXPORTED = (
    Table(REGISTRY_TABLE, ("tenant_id",)),
    Table("tenant.tenant_settings", ("tenant_id",)),
    Table("tenant.tenant_users", ("user_id",)),
    Table("tenant.host_routes", ("host",)),
    Table("features.tenant_plans", ("tenant_id",)),
    Table("features.feature_overrides", ("feature",)),
    Table("features.limit_overrides", ("resource",)),
    Table("sites.sites", ("site_id",)),
    Table(AUDIT_EVENTS, ("sequence",)),
)

#: Tables holding tenant rows that an export leaves out, and why (a test holds this list
#: and :data:`EXPORTED` to every table with a ``tenant_id`` column).
LEFT_OUT = {
    "tenant.migrations": "bookkeeping of data migrations between tenants (owned by the platform tenant)",
    "tenant.migration_settings_backup": "undo copies of a migration, gone when it finishes",
    "sites.create_requests": "idempotency records of the source's own retries, honoured for 24 h; never copied",
    **{
        f"{schema}.{table}": "bookkeeping of the data saga's copies into the tenant"
        for schema in ("sites", "features")
        for table in ("tenant_migrations", "tenant_migration_rows")
    },
    "features.usage_hourly": "the platform's billing record of the source tenant id, kept after offboarding",
    "features.usage_flushes": "retry guard of usage flushes, kept for days",
    **{
        f"{schema}.audit_outbox": "events on their way to the audit log: exported once they are in the chain"
        for schema in SERVICES
    },
}

EXPORTABLE_STATES = ("STATE_ACTIVE", "STATE_SUSPENDED")
_SETTINGS = "tenant.tenant_settings"
#: The feature gate's row every provisioned tenant has, in the cell holding its rows.
PLAN_TABLE = "features.tenant_plans"
#: The registry's schema: in the home cell, whichever cell holds the tenant's other rows.
REGISTRY_SCHEMA = "tenant"
NO_FAULTS = Faults("")
log = logging.getLogger("towerco.tenant_transfer")


class TransferError(RuntimeError):
    """The export or import was refused; nothing was written. The message says why and what to do."""


async def schema_versions(conn: asyncpg.Connection[Any]) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT service, max(version) AS version FROM platform_meta.schema_migrations"
        " WHERE service = ANY($1::text[]) GROUP BY service ORDER BY service",
        list(SERVICES),
    )
    return {row["service"]: row["version"] for row in rows}


async def _columns(conn: asyncpg.Connection[Any], table: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped"
        " AND attgenerated = '' ORDER BY attnum",
        table,
    )
    return [row["attname"] for row in rows]


async def tenant_tables(conn: asyncpg.Connection[Any]) -> list[str]:
    """Every table of the services' schemas with a ``tenant_id`` column (partitions' parents only)."""
    rows = await conn.fetch(
        "SELECT n.nspname || '.' || c.relname AS name FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped"
        " WHERE n.nspname = ANY($1::text[]) AND c.relkind IN ('r', 'p') AND NOT c.relispartition ORDER BY 1",
        list(SERVICES),
    )
    return [row["name"] for row in rows]


async def export_tenant(
    conn: asyncpg.Connection[Any], tenant_id: str, cell_conn: asyncpg.Connection[Any] | None = None
) -> TenantArchive:
    """Every exported row of ``tenant_id``; TransferError if it cannot be exported.

    ``conn`` is the home cell's database (the registry); ``cell_conn`` the tenant's cell's,
    when that is another database. Each database is read in one snapshot.
    """
    cell = cell_conn or conn
    await _utc(conn, cell)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        state = await conn.fetchval("SELECT state FROM tenant.tenants WHERE tenant_id = $1", tenant_id)
        if state is None:
            raise TransferError(f"tenant {tenant_id!r} does not exist in this database")
        if state not in EXPORTABLE_STATES:
            raise TransferError(f"tenant {tenant_id!r} is {state}; only an ACTIVE or SUSPENDED tenant is exported")
        archive = TenantArchive(
            tenant_id=tenant_id, export_time=rfc3339(datetime.now(UTC)), schema_versions=await schema_versions(conn)
        )
        await _read(conn, archive, _registry_tables() if cell is not conn else EXPORTED)
    if cell is not conn:
        async with cell.transaction(isolation="repeatable_read", readonly=True):
            await _require_versions(cell, archive.schema_versions, "the tenant's cell")
            await _read(cell, archive, _cell_tables())
        archive.tables = {table.name: archive.tables[table.name] for table in EXPORTED}  # the file's order
    if not archive.tables[PLAN_TABLE]:
        # Every provisioned tenant has its plan row in its cell: none means the rows are elsewhere.
        raise TransferError(
            f"tenant {tenant_id!r}'s rows are not in {'the cell given' if cell is not conn else 'this database'}: "
            "it is placed in another cell (its tenant record's `cell`); pass that cell's --cell-database-url"
        )
    check = check_chain(archive.events())
    if not check.valid:
        raise TransferError(
            f"tenant {tenant_id!r}'s audit chain does not verify at event {check.first_invalid}: "
            "an export would be refused on import; investigate the log first (VerifyChain)"
        )
    return archive


async def _read(conn: asyncpg.Connection[Any], archive: TenantArchive, tables: Iterable[Table]) -> None:
    for table in tables:
        order = ", ".join(table.order)
        rows = await conn.fetch(
            f"SELECT to_jsonb(t) AS row FROM {table.name} AS t WHERE t.tenant_id = $1 ORDER BY {order}",
            archive.tenant_id,
        )
        archive.tables[table.name] = [_json(row["row"]) for row in rows]


def _registry_tables() -> list[Table]:
    """The registry's tables: in the home cell, whichever cell holds the tenant's other rows."""
    return [t for t in EXPORTED if t.name.startswith(f"{REGISTRY_SCHEMA}.")]


def _cell_tables() -> list[Table]:
    return [t for t in EXPORTED if not t.name.startswith(f"{REGISTRY_SCHEMA}.")]


async def _utc(*conns: asyncpg.Connection[Any]) -> None:
    for conn in set(conns):
        await conn.execute("SET TIME ZONE 'UTC'")  # to_jsonb writes timestamps in the session's zone


async def record_export(conn: asyncpg.Connection[Any], archive: TenantArchive, file: str) -> None:
    """The ``tenants.export`` event in the tenant's chain (after the file is written)."""
    async with conn.transaction():
        await _append_event(
            conn,
            archive.tenant_id,
            "tenants.export",
            {"file": file, "sha256": archive.sha256, "rows": archive.row_count},
        )


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
    await _utc(conn, cell)
    rows = {table.name: _for_target(table.name, archive.tables.get(table.name, []), archive.tenant_id, target, box)
            for table in EXPORTED}  # fmt: skip
    for row in rows[REGISTRY_TABLE]:
        row["cell"] = placement  # where this import puts its rows, whatever the source's was
    written: dict[str, int] = {}
    cell_committed = False
    try:
        async with conn.transaction():
            await _prepare(conn, archive, target, "this database" if cell is conn else "the home cell")
            await _write(conn, rows, _registry_tables() if cell is not conn else EXPORTED, written)
            if cell is conn:
                await _record_import(conn, archive, target)
                faults.check("tenant_import.before_commit")
            else:
                async with cell.transaction():
                    await _prepare(cell, archive, target, "the tenant's cell")
                    await _write(cell, rows, _cell_tables(), written)
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
    await _require_versions(conn, archive.schema_versions, where)
    await _require_empty(conn, target)


async def _require_versions(conn: asyncpg.Connection[Any], expected: dict[str, int], where: str) -> None:
    versions = await schema_versions(conn)
    if versions != expected:
        raise TransferError(
            f"the file was written at schema versions {expected}, {where} is at {versions}: "
            "import it into a database at the same versions"
        )


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
        columns = ", ".join(await _columns(conn, table.name))
        try:
            status = await conn.execute(
                f"INSERT INTO {table.name} ({columns}) SELECT {columns}"
                f" FROM jsonb_populate_recordset(NULL::{table.name}, $1::jsonb)",
                _dumps(rows[table.name]),
            )
        except asyncpg.PostgresError as exc:  # the transaction rolls back: nothing stays
            raise TransferError(f"the rows of {table.name} could not be written ({exc})") from None
        written[table.name] = int(status.rsplit(" ", 1)[1])


async def _record_import(conn: asyncpg.Connection[Any], archive: TenantArchive, target: str) -> None:
    """``tenants.import`` closes the new chain, pointing at the file and the chain it came from."""
    head = archive.events()[-1]["hash"] if archive.events() else ""
    details = {"source_tenant_id": archive.tenant_id, "sha256": archive.sha256, "source_chain_head": head}
    await _append_event(conn, target, "tenants.import", {**details, "rows": archive.row_count})


async def _remove_cell_rows(conn: asyncpg.Connection[Any], target: str) -> None:
    """Undo a committed cell part whose registry part failed: the id holds nothing again."""
    try:
        async with conn.transaction():
            # Audit events are append-only but for the retention role (its policy and trigger).
            await conn.execute("SET LOCAL ROLE audit_retention")
            await conn.execute("DELETE FROM audit.events WHERE tenant_id = $1", target)
            await conn.execute("RESET ROLE")
            for table in reversed(_cell_tables()):
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


async def _append_event(conn: asyncpg.Connection[Any], tenant_id: str, action: str, details: dict[str, Any]) -> None:
    """One event at the head of ``tenant_id``'s chain, as the audit service appends it (its lock, its hash)."""
    await conn.execute(audit_queries.LOCK_CHAIN, tenant_id)
    head = await conn.fetchrow(audit_queries.CHAIN_HEAD, tenant_id)
    sequence, prev_hash = (head["sequence"] + 1, head["hash"]) if head else (1, "")
    event = ChainedEvent(
        tenant_id=tenant_id, sequence=sequence, event_id=str(uuid.uuid4()), user_id=_operator(),
        action=action, resource=f"tenants/{tenant_id}", details=details, ip_address="", request_id="",
        outcome="OK", create_time=datetime.now(UTC),
        prev_hash=prev_hash,
    )  # fmt: skip
    await conn.execute(
        "INSERT INTO audit.events (tenant_id, sequence, event_id, user_id, action, resource, details, ip_address,"
        " request_id, outcome, create_time, prev_hash, hash) VALUES ($1, $2, $3::uuid, $4, $5, $6, $7::jsonb, $8,"
        " $9, $10, $11, $12, $13)",
        event.tenant_id, event.sequence, event.event_id, event.user_id, event.action, event.resource,
        _dumps(details), event.ip_address, event.request_id, event.outcome, event.create_time, event.prev_hash,
        event.compute_hash(),
    )  # fmt: skip


def _operator() -> str:
    """Who ran the command, as the audit event names them."""
    try:
        return f"operator:{getpass.getuser()}"[:128]
    except (KeyError, OSError):  # no user name in this container
        return "operator"


async def publish_tenant(conn: asyncpg.Connection[Any], cache: TenantCache, tenant_id: str) -> None:
    """Announce the imported tenant to every service's cache, as the registry announces a change."""
    row = await conn.fetchrow(
        "SELECT t.*, ARRAY(SELECT host FROM tenant.host_routes h WHERE h.tenant_id = t.tenant_id) AS domains"
        " FROM tenant.tenants t WHERE t.tenant_id = $1",
        tenant_id,
    )
    document = await conn.fetchval("SELECT document FROM tenant.tenant_settings WHERE tenant_id = $1", tenant_id)
    assert row is not None
    await records.publish(cache, row, _json(document) if document is not None else None)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def missing_from_lists(tables: Iterable[str]) -> list[str]:
    """Tables with tenant rows that neither :data:`EXPORTED` nor :data:`LEFT_OUT` names."""
    named = {t.name for t in EXPORTED} | set(LEFT_OUT)
    return sorted(set(tables) - named)
