"""``make tenant-export``, and what export and import share: which tables carry a tenant, and how.

Export and import (``tenant_import.py``) run with administrative DSNs, the ones migrations
run with: the home cell's, where the registry is, and the tenant's cell's when its rows
live in another (every cell is one PostgreSQL database with every service's schema).

**Export** reads every table of :data:`EXPORTED` for the tenant, the registry's at home and
the rest in the tenant's cell, each database in one REPEATABLE READ snapshot, so the file is
one moment of the tenant; refuses a tenant that is not ACTIVE or SUSPENDED, whose audit
chain does not verify, or whose rows are not in the database given; then appends a
``tenants.export`` event to the tenant's own chain, naming the file's digest.

Why the database and not the services' TenantDataService: that saga copies between two
tenants of one database and streams nothing out or in; and an import must be all or
nothing across four schemas, while the audit log is append-only for the services' roles,
so a service-by-service import could not be undone once its audit part was written. Every
statement names the one tenant it reads or writes (``WHERE tenant_id = $1``); identifiers
come from :data:`EXPORTED` only.
"""

from __future__ import annotations

import getpass
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from services.audit import queries as audit_queries
from services.audit.hash_chain import ChainedEvent, rfc3339

from .tenant_archive import AUDIT_EVENTS, TenantArchive, check_chain


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
    Table("tenant.tenant_roles", ("role_id",)),
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
    "tenant.tenant_moves": "the platform's record of the tenant's moves between cells (MoveTenant), not its data",
    "tenant.tenant_sso": "its issuer is unique platform-wide: a copy would take it from the source; set it again",
    "features.usage_hourly": "the platform's billing record of the source tenant id, kept after offboarding",
    "features.usage_flushes": "retry guard of usage flushes, kept for days",
    **{
        f"{schema}.audit_outbox": "events on their way to the audit log: exported once they are in the chain"
        for schema in SERVICES
    },
}

EXPORTABLE_STATES = ("STATE_ACTIVE", "STATE_SUSPENDED")
#: The feature gate's row every provisioned tenant has, in the cell holding its rows.
PLAN_TABLE = "features.tenant_plans"
#: The registry's schema: in the home cell, whichever cell holds the tenant's other rows.
REGISTRY_SCHEMA = "tenant"


class TransferError(RuntimeError):
    """The export or import was refused; nothing was written. The message says why and what to do."""


async def schema_versions(conn: asyncpg.Connection[Any]) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT service, max(version) AS version FROM platform_meta.schema_migrations"
        " WHERE service = ANY($1::text[]) GROUP BY service ORDER BY service",
        list(SERVICES),
    )
    return {row["service"]: row["version"] for row in rows}


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
    await utc(conn, cell)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        state = await conn.fetchval("SELECT state FROM tenant.tenants WHERE tenant_id = $1", tenant_id)
        if state is None:
            raise TransferError(f"tenant {tenant_id!r} does not exist in this database")
        if state not in EXPORTABLE_STATES:
            raise TransferError(f"tenant {tenant_id!r} is {state}; only an ACTIVE or SUSPENDED tenant is exported")
        archive = TenantArchive(
            tenant_id=tenant_id, export_time=rfc3339(datetime.now(UTC)), schema_versions=await schema_versions(conn)
        )
        await _read(conn, archive, registry_tables() if cell is not conn else EXPORTED)
    if cell is not conn:
        async with cell.transaction(isolation="repeatable_read", readonly=True):
            await require_versions(cell, archive.schema_versions, "the tenant's cell")
            await _read(cell, archive, cell_tables())
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
        archive.tables[table.name] = [as_json(row["row"]) for row in rows]


def registry_tables() -> list[Table]:
    """The registry's tables: in the home cell, whichever cell holds the tenant's other rows."""
    return [t for t in EXPORTED if t.name.startswith(f"{REGISTRY_SCHEMA}.")]


def cell_tables() -> list[Table]:
    return [t for t in EXPORTED if not t.name.startswith(f"{REGISTRY_SCHEMA}.")]


async def utc(*conns: asyncpg.Connection[Any]) -> None:
    for conn in set(conns):
        await conn.execute("SET TIME ZONE 'UTC'")  # to_jsonb writes timestamps in the session's zone


async def record_export(conn: asyncpg.Connection[Any], archive: TenantArchive, file: str) -> None:
    """The ``tenants.export`` event in the tenant's chain (after the file is written)."""
    async with conn.transaction():
        await append_event(
            conn,
            archive.tenant_id,
            "tenants.export",
            {"file": file, "sha256": archive.sha256, "rows": archive.row_count},
        )


async def require_versions(conn: asyncpg.Connection[Any], expected: dict[str, int], where: str) -> None:
    versions = await schema_versions(conn)
    if versions != expected:
        raise TransferError(
            f"the file was written at schema versions {expected}, {where} is at {versions}: "
            "import it into a database at the same versions"
        )


async def append_event(conn: asyncpg.Connection[Any], tenant_id: str, action: str, details: dict[str, Any]) -> None:
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
        compact_json(details), event.ip_address, event.request_id, event.outcome, event.create_time, event.prev_hash,
        event.compute_hash(),
    )  # fmt: skip


def _operator() -> str:
    """Who ran the command, as the audit event names them."""
    try:
        return f"operator:{getpass.getuser()}"[:128]
    except (KeyError, OSError):  # no user name in this container
        return "operator"


def as_json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def missing_from_lists(tables: Iterable[str]) -> list[str]:
    """Tables with tenant rows that neither :data:`EXPORTED` nor :data:`LEFT_OUT` names."""
    named = {t.name for t in EXPORTED} | set(LEFT_OUT)
    return sorted(set(tables) - named)
