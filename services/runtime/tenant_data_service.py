"""towerco.internal.v1.TenantDataService, written once for every service that owns tenant data.

A service declares what its tenant data is (:class:`TenantDataSpec`): the table of each data
type, its key, the columns a copy carries, and the tables a purge empties. The rest is the
same everywhere:

- every transaction is bound to exactly one tenant (``context.platform_scope``, then
  ``Database.transaction()``), so RLS checks every statement: a copy reads the source in
  one transaction and writes the target in another, never both in one;
- a finished copy is recorded per (target, migration_id, data_type) together with every key
  it wrote, so a repeat copies nothing more and an undo removes exactly those rows;
- rows travel in their composite text form (``row::text``, then ``text::table``), so every
  column type, a jsonb ``null`` included, arrives exactly as it was read.

Identifiers come from the static spec and are checked when it is made; values are always
parameters. Each service's spec is its ``tenant_data_spec.py``.

(The bookkeeping's SQL, ``sql/tenant_data/`` and the sites' ``0002_tenant_data.sql``, still
calls this module ``tenant_data.py``: applied migrations are checksummed, so their text
stays as it was applied.)
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
from grpc import aio
from towerco.internal.v1 import tenant_data_pb2 as pb
from towerco.internal.v1 import tenant_data_pb2_grpc as pb_grpc

from . import context
from .errors import ErrorReason, ServiceError, failed_precondition
from .ids import TENANT_ID, IdRule
from .server import Runtime
from .validation import Violations

log = logging.getLogger("towerco.tenant_data")

Ctx = aio.ServicerContext[Any, Any]
Key = tuple[str, ...]

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")
MIGRATION_ID = IdRule(first="A-Za-z0-9", rest="A-Za-z0-9._:-", min_length=1, max_length=64)
#: Advisory locks of tenant migrations live under this first key (the second: a hash).
_LOCK_NAMESPACE = 0x7E4A_0D47
#: Prepare lists at most this many conflicts; any at all already blocks the copy.
MAX_REPORTED_CONFLICTS = 1000
#: ErrorInfo metadata travels in a trailer that clients cap at 8 KiB; stay well below.
MAX_CONFLICTS_METADATA_CHARS = 1000


def _identifier(name: str, what: str) -> str:
    if not _IDENTIFIER.fullmatch(name):
        raise ValueError(f"{what} must be a plain lower-case SQL identifier, not {name!r}")
    return name


@dataclass(frozen=True)
class CopySpec:
    """One data type: the table it lives in and what a copy carries into the target."""

    #: Table in the service's schema, e.g. ``sites``.
    table: str
    #: Columns after ``tenant_id`` that identify a row, e.g. ``("site_id",)``; conflicts name them.
    key: tuple[str, ...]
    #: Every other column a copy carries verbatim. Generated columns are left out: the
    #: target recomputes them (and refuses to have them written).
    columns: tuple[str, ...]

    def __post_init__(self) -> None:
        names = [_identifier(n, "a column") for n in (*self.key, *self.columns)]
        _identifier(self.table, "a table")
        if not self.key:
            raise ValueError(f"{self.table}: a copy needs the key that identifies its rows")
        if "tenant_id" in names:
            raise ValueError(f"{self.table}: tenant_id is always the target's; do not list it")
        if len(set(names)) != len(names):
            raise ValueError(f"{self.table}: a column is listed twice across key and columns")


@dataclass(frozen=True)
class TenantDataSpec:
    """What a service's tenant data is; see ``services/sites/tenant_data_spec.py``."""

    #: The service's PostgreSQL schema; every table below lives in it.
    schema: str
    #: Data types the registry may migrate (``sites``), each with its table.
    copies: Mapping[str, CopySpec]
    #: Every table holding tenant rows, in the order a purge empties them (children
    #: first if there are foreign keys). The tracking tables are added after them.
    purge_tables: tuple[str, ...]
    #: Tracking tables: the finished parts of each migration and the keys each one wrote.
    migrations_table: str = "tenant_migrations"
    migration_rows_table: str = "tenant_migration_rows"
    #: Tables a purge leaves alone on purpose: the audit outbox, whose events about the
    #: tenant (its offboarding included) must still reach the audit log.
    kept_tables: tuple[str, ...] = ("audit_outbox",)

    def __post_init__(self) -> None:
        _identifier(self.schema, "the schema")
        for table in (*self.purge_tables, self.migrations_table, self.migration_rows_table):
            _identifier(table, "a table")
        for data_type, copy in self.copies.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,49}", data_type):
                raise ValueError(f"data type {data_type!r} must be a lower-case name")
            if copy.table not in self.purge_tables:
                raise ValueError(f"data type {data_type!r}: table {copy.table} must be in purge_tables too")
        if {self.migrations_table, self.migration_rows_table} & set(self.purge_tables):
            raise ValueError("the tracking tables are purged anyway; leave them out of purge_tables")

    @property
    def all_tables(self) -> tuple[str, ...]:
        """Every table a purge empties, tracking tables last."""
        return (*self.purge_tables, self.migrations_table, self.migration_rows_table)


# Tables (partitions excepted: their parent's DELETE reaches them) and their columns.
_SCHEMA_COLUMNS_SQL = """
SELECT c.relname AS table_name, a.attname AS column_name, a.attgenerated <> '' AS generated
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition
ORDER BY c.relname, a.attnum
"""


async def spec_problems(conn: asyncpg.Connection[Any], spec: TenantDataSpec) -> list[str]:
    """What ``spec`` misses of the live schema: tables a purge would leave behind, columns a copy would drop.

    Run with a connection that can see the schema's catalog (any role with USAGE on it).
    """
    columns: dict[str, dict[str, bool]] = {}
    for row in await conn.fetch(_SCHEMA_COLUMNS_SQL, spec.schema):
        columns.setdefault(row["table_name"], {})[row["column_name"]] = row["generated"]
    problems: list[str] = []
    for table in sorted(set(columns) - set(spec.all_tables) - set(spec.kept_tables)):
        problems.append(f"{spec.schema}.{table} is not in purge_tables: a purge would leave its rows behind")
    for table in spec.all_tables:
        if table not in columns:
            problems.append(f"{spec.schema}.{table} does not exist")
        elif "tenant_id" not in columns[table]:
            problems.append(f"{spec.schema}.{table} has no tenant_id column")
    for data_type, copy in spec.copies.items():
        present = columns.get(copy.table, {})
        listed = (*copy.key, *copy.columns)
        for name in listed:
            if name not in present:
                problems.append(f"{data_type}: {spec.schema}.{copy.table} has no column {name}")
            elif present[name]:
                problems.append(f"{data_type}: {spec.schema}.{copy.table}.{name} is generated and cannot be copied")
        for name, generated in present.items():
            if not generated and name != "tenant_id" and name not in listed:
                problems.append(f"{data_type}: {spec.schema}.{copy.table}.{name} is not copied")
    return problems


@dataclass(frozen=True)
class _CopySql:
    """The statements of one data type, written out once from its spec."""

    read_keys: str
    read_rows: str
    conflicts: str
    insert: str
    undo: str


def _copy_sql(spec: TenantDataSpec, copy: CopySpec) -> _CopySql:
    table = f"{spec.schema}.{copy.table}"
    tracked = f"{spec.schema}.{spec.migration_rows_table}"
    key_text = ", ".join(f"t.{k}::text" for k in copy.key)
    order = ", ".join(f"t.{k}" for k in copy.key)
    columns = ", ".join((*copy.key, *copy.columns))
    from_rows = ", ".join(f"r.{c}" for c in (*copy.key, *copy.columns))
    key_arrays = ", ".join(f"${i}::text[]" for i in range(2, 2 + len(copy.key)))
    # Keys compare in their text form, as they are tracked; for text keys (the usual case)
    # the cast is a no-op and the primary key index serves the join.
    joins = " AND ".join(f"t.{k}::text = source.{k}" for k in copy.key)
    undo_joins = " AND ".join(f"t.{k}::text = m.row_key[{i}]" for i, k in enumerate(copy.key, 1))
    return _CopySql(
        read_keys=f"SELECT ARRAY[{key_text}] AS row_key FROM {table} AS t WHERE t.tenant_id = $1 ORDER BY {order}",
        read_rows=(
            f"SELECT ARRAY[{key_text}] AS row_key, t::text AS row FROM {table} AS t"
            f" WHERE t.tenant_id = $1 ORDER BY {order}"
        ),
        conflicts=(
            f"SELECT ARRAY[{key_text}] AS row_key FROM {table} AS t"
            f" JOIN unnest({key_arrays}) AS source({', '.join(copy.key)}) ON {joins}"
            f" WHERE t.tenant_id = $1 ORDER BY {order}"
        ),
        # ON CONFLICT DO NOTHING: a row whose key the target holds (even one committed a
        # moment ago, or clashing on any other unique key) is skipped, so it is missing
        # from RETURNING, and that is what fails the copy.
        insert=f"""
            WITH copied AS (
                INSERT INTO {table} AS t (tenant_id, {columns})
                SELECT $1, {from_rows} FROM unnest($4::text[]::{table}[]) AS r
                ON CONFLICT DO NOTHING
                RETURNING ARRAY[{key_text}] AS row_key
            )
            INSERT INTO {tracked} (tenant_id, migration_id, data_type, row_key)
            SELECT $1, $2, $3, row_key FROM copied
            RETURNING row_key""",
        undo=f"""
            WITH removed AS (
                DELETE FROM {table} AS t USING {tracked} AS m
                WHERE t.tenant_id = $1 AND m.tenant_id = $1 AND m.migration_id = $2 AND m.data_type = $3
                  AND {undo_joins}
                RETURNING 1
            )
            SELECT count(*) FROM removed""",
    )


@dataclass(frozen=True)
class _TrackingSql:
    lock: str
    finished: str
    record: str
    forget_rows: str
    forget_part: str

    @classmethod
    def of(cls, spec: TenantDataSpec) -> _TrackingSql:
        parts = f"{spec.schema}.{spec.migrations_table}"
        rows = f"{spec.schema}.{spec.migration_rows_table}"
        one = "tenant_id = $1 AND migration_id = $2 AND data_type = $3"
        return cls(
            # Serialises applies and undos of one migration part: concurrent repeats copy once.
            lock=(
                f"SELECT pg_advisory_xact_lock({_LOCK_NAMESPACE},"
                " hashtext($1::text || '/' || $2::text || '/' || $3::text))"
            ),
            finished=f"SELECT source_tenant_id, row_count FROM {parts} WHERE {one}",
            record=(
                f"INSERT INTO {parts} (tenant_id, migration_id, data_type, source_tenant_id, row_count)"
                " VALUES ($1, $2, $3, $4, $5)"
            ),
            forget_rows=f"DELETE FROM {rows} WHERE {one}",
            forget_part=f"DELETE FROM {parts} WHERE {one}",
        )


class TenantDataServicer(pb_grpc.TenantDataServiceServicer):
    """Prepare, apply and undo tenant migrations, and purge tenants, as the spec declares."""

    def __init__(self, runtime: Runtime, spec: TenantDataSpec) -> None:
        self._db = runtime.db
        self._faults = runtime.faults
        self._spec = spec
        self._copies = {data_type: _copy_sql(spec, copy) for data_type, copy in spec.copies.items()}
        self._tracking = _TrackingSql.of(spec)
        self._purges = tuple(f"DELETE FROM {spec.schema}.{t} WHERE tenant_id = $1" for t in spec.all_tables)

    async def PrepareTenantMigration(
        self, request: pb.PrepareTenantMigrationRequest, ctx: Ctx
    ) -> pb.PrepareTenantMigrationResponse:
        sql = self._check_migration(request)
        async with self._bound(request.source_tenant_id, "prepare tenant migration (source)", readonly=True) as conn:
            keys = [tuple(r["row_key"]) for r in await conn.fetch(sql.read_keys, request.source_tenant_id)]
        async with self._bound(request.target_tenant_id, "prepare tenant migration (target)", readonly=True) as conn:
            conflicts = await _conflicts(conn, sql, request.target_tenant_id, keys)
        return pb.PrepareTenantMigrationResponse(
            row_count=len(keys), conflicts=[_key_text(k) for k in conflicts[:MAX_REPORTED_CONFLICTS]]
        )

    async def ApplyTenantMigration(
        self, request: pb.ApplyTenantMigrationRequest, ctx: Ctx
    ) -> pb.ApplyTenantMigrationResponse:
        sql = self._check_migration(request)
        target, part = request.target_tenant_id, (request.migration_id, request.data_type)
        async with self._bound(target, "apply tenant migration (target)", readonly=True) as conn:
            done = await self._finished(conn, request)
        if done is not None:
            return pb.ApplyTenantMigrationResponse(row_count=done)

        async with self._bound(request.source_tenant_id, "apply tenant migration (source)", readonly=True) as conn:
            rows = await conn.fetch(sql.read_rows, request.source_tenant_id)
        keys: list[Key] = [tuple(r["row_key"]) for r in rows]

        async with self._bound(target, "apply tenant migration (target)") as conn:
            await conn.execute(self._tracking.lock, target, *part)
            done = await self._finished(conn, request)
            if done is not None:  # a concurrent repeat finished while we read the source
                return pb.ApplyTenantMigrationResponse(row_count=done)
            inserted = await conn.fetch(sql.insert, target, *part, [r["row"] for r in rows])
            copied = {tuple(r["row_key"]) for r in inserted}
            if len(copied) != len(keys):
                # Raising rolls the whole copy back: nothing of it stays in the target.
                raise _conflict_error(request.data_type, [k for k in keys if k not in copied])
            await conn.execute(self._tracking.record, target, *part, request.source_tenant_id, len(copied))
            self._faults.check("tenant_data.apply.before_commit")  # tests: a failure here leaves nothing
        log.info(
            "migration %s copied %d %s of tenant %s into tenant %s",
            request.migration_id,
            len(copied),
            request.data_type,
            request.source_tenant_id,
            target,
        )
        return pb.ApplyTenantMigrationResponse(row_count=len(copied))

    async def UndoTenantMigration(
        self, request: pb.UndoTenantMigrationRequest, ctx: Ctx
    ) -> pb.UndoTenantMigrationResponse:
        v = Violations()
        _check_migration_id(v, request.migration_id)
        _check_tenant(v, "target_tenant_id", request.target_tenant_id)
        sql = self._data_type(v, request.data_type)
        v.raise_if_any()
        assert sql is not None
        target, part = request.target_tenant_id, (request.migration_id, request.data_type)
        async with self._bound(target, "undo tenant migration") as conn:
            await conn.execute(self._tracking.lock, target, *part)
            removed: int = await conn.fetchval(sql.undo, target, *part)
            await conn.execute(self._tracking.forget_rows, target, *part)
            await conn.execute(self._tracking.forget_part, target, *part)
        if removed:
            log.info("migration %s undone: %d %s removed from tenant %s", part[0], removed, part[1], target)
        return pb.UndoTenantMigrationResponse(row_count=removed)

    async def PurgeTenantData(self, request: pb.PurgeTenantDataRequest, ctx: Ctx) -> pb.PurgeTenantDataResponse:
        v = Violations()
        _check_tenant(v, "tenant_id", request.tenant_id)
        v.raise_if_any()
        deleted = 0
        async with self._bound(request.tenant_id, "purge tenant data") as conn:
            for statement in self._purges:
                status = await conn.execute(statement, request.tenant_id)
                deleted += int(status.rsplit(" ", 1)[1])
        log.info("tenant %s purged: %d rows deleted from schema %s", request.tenant_id, deleted, self._spec.schema)
        return pb.PurgeTenantDataResponse(row_count=deleted)

    @asynccontextmanager
    async def _bound(
        self, tenant_id: str, purpose: str, *, readonly: bool = False
    ) -> AsyncIterator[asyncpg.Connection[Any]]:
        """A transaction bound to ``tenant_id``: the platform path, explicit and logged."""
        with context.platform_scope(tenant_id, purpose):
            async with self._db.transaction(readonly=readonly) as conn:
                yield conn

    async def _finished(self, conn: asyncpg.Connection[Any], request: pb.ApplyTenantMigrationRequest) -> int | None:
        """The stored count of a finished copy of this part, or None if there is none yet."""
        row = await conn.fetchrow(
            self._tracking.finished, request.target_tenant_id, request.migration_id, request.data_type
        )
        if row is None:
            return None
        if row["source_tenant_id"] != request.source_tenant_id:
            raise failed_precondition(
                f"migration {request.migration_id!r} already copied {request.data_type} from tenant "
                f"{row['source_tenant_id']!r}, not {request.source_tenant_id!r}",
                ErrorReason.MIGRATION_ID_REUSED,
                migration_id=request.migration_id,
                source_tenant_id=row["source_tenant_id"],
            )
        count: int = row["row_count"]
        return count

    def _check_migration(self, request: pb.PrepareTenantMigrationRequest | pb.ApplyTenantMigrationRequest) -> _CopySql:
        v = Violations()
        _check_migration_id(v, request.migration_id)
        _check_tenant(v, "source_tenant_id", request.source_tenant_id)
        _check_tenant(v, "target_tenant_id", request.target_tenant_id)
        if request.source_tenant_id and request.source_tenant_id == request.target_tenant_id:
            v.add("target_tenant_id", "must differ from source_tenant_id")
        found = self._data_type(v, request.data_type)
        v.raise_if_any()
        assert found is not None
        return found

    def _data_type(self, v: Violations, data_type: str) -> _CopySql | None:
        found = self._copies.get(data_type)
        if found is None:
            owned = ", ".join(sorted(self._copies))
            v.add("data_type", f"must be one of the types this service owns: {owned}" if data_type else "is required")
        return found


async def _conflicts(conn: asyncpg.Connection[Any], sql: _CopySql, target: str, keys: Sequence[Key]) -> list[Key]:
    """The keys of ``keys`` that the target already holds."""
    if not keys:
        return []
    columns = [list(column) for column in zip(*keys, strict=True)]
    return [tuple(r["row_key"]) for r in await conn.fetch(sql.conflicts, target, *columns)]


def _conflict_error(data_type: str, conflicts: Sequence[Key]) -> ServiceError:
    ids = [_key_text(k) for k in conflicts]
    shown: list[str] = []
    for one in ids:
        if len(",".join([*shown, one])) > MAX_CONFLICTS_METADATA_CHARS:
            break
        shown.append(one)
    listed = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
    return failed_precondition(
        f"the target tenant already holds {len(ids)} of the {data_type} being copied: {listed}",
        ErrorReason.MIGRATION_CONFLICT,
        conflicts=",".join(shown),
        conflict_count=str(len(ids)),
        data_type=data_type,
    )


def _key_text(key: Key) -> str:
    return "/".join(key)


def _check_tenant(v: Violations, name: str, value: str) -> None:
    if not value:
        v.add(name, "is required")
    elif not context.is_valid_tenant_id(value):
        v.add(name, TENANT_ID.problem)


def _check_migration_id(v: Violations, value: str) -> None:
    v.identifier("migration_id", value, MIGRATION_ID)
