"""MoveTenant: a tenant's rows moved to another database cell, online (README: Moving a tenant).

The registry runs each move in the background, recorded in ``tenant.tenant_moves`` (stages
PENDING, FROZEN, COPIED, SWITCHED, DONE, or ROLLED_BACK), through a DSN of every cell
(``TENANT_MOVER_DATABASE_URLS``):

1. **Freeze.** The tenant's row in the source cell's ``platform_meta.tenants_away`` is
   committed, then the mover takes the tenant's barrier lock exclusively
   (services/runtime/migrations.py): that waits for every write transaction in flight (they
   hold it shared) and, from then on, every write of the tenant in that cell is refused with
   UNAVAILABLE ``TENANT_MOVING`` (services/runtime/db.py); reads go on.
2. **Copy and verify.** Every table of :data:`MOVED` is read in one REPEATABLE READ snapshot
   of the source (``COPY ... (FORMAT binary)``) and written in ONE transaction on the target,
   which also checks the row counts and the tenant's audit chain as the target holds it (the
   events are copied unchanged, under the same ids and hashes) before committing: a failure
   leaves nothing on the target.
3. **Switch.** One registry transaction sets the tenant's ``cell`` (publishing it to every
   service's cache like any tenant change): its writes go to the target from then on. The
   freeze lasted from step 1 to here (``freeze_duration``, logged).
4. **Purge.** After :data:`PURGE_DELAY_SECONDS` (the caches converge) the source's rows are
   deleted; its ``tenants_away`` row stays, refusing the writes of a process whose cache
   still names the source cell (they retry and reach the target).

Any failure before the switch rolls back: the target's copy is deleted, the away row
removed, the tenant stays where it was and takes writes again. A registry restarting with a
move unfinished rolls it back (before the switch) or purges again (after it).
"""

from __future__ import annotations

import asyncio
import io
import logging
import uuid
from collections.abc import Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import asyncpg
from google.protobuf import duration_pb2
from towerco.tenant.v1 import tenant_registry_service_pb2 as pb

from services.audit import convert
from services.audit import queries as audit_queries
from services.audit.hash_chain import ChainCheck
from services.runtime import cells, context, idempotency
from services.runtime.audit import Auditor
from services.runtime.db import Database, init_connection
from services.runtime.errors import ErrorReason, FieldViolation, failed_precondition, invalid_argument, not_found
from services.runtime.faults import Faults
from services.runtime.ids import TENANT_ID
from services.runtime.migrations import TENANT_MOVE_LOCK
from services.runtime.plans import Plans
from services.runtime.tasks import KeyedTasks
from services.runtime.tenant_cache import TenantCache
from services.runtime.validation import Violations

from . import records

log = logging.getLogger("towerco.tenant.move")

#: Every table holding the tenant's rows in its cell, parents first: deploy/local/tenant_transfer's
#: cell tables (a test holds this to them), plus what an export leaves out but a move must keep: the
#: idempotency records of site creates (a retry of a create acknowledged just before the freeze must
#: replay on the target) and the usage records with their flush guard (GetUsage reads the tenant's
#: cell; a usage batch refused during the freeze is kept and flushed again, to the target).
MOVED = (
    "features.tenant_plans",
    "features.feature_overrides",
    "features.limit_overrides",
    "features.usage_hourly",
    "features.usage_flushes",
    "sites.sites",
    "sites.create_requests",
    "audit.events",
)
AUDIT_EVENTS = "audit.events"
#: How long the source keeps its rows after the switch, for the caches to learn the new cell.
PURGE_DELAY_SECONDS = 2.0
#: How long the freeze waits for the writes in flight (they are bounded by the statement timeout).
BARRIER_TIMEOUT = "30s"
MOVABLE_STATES = ("STATE_ACTIVE", "STATE_SUSPENDED")
_UNFINISHED = ("PENDING", "FROZEN", "COPIED", "SWITCHED")


class MoveFailedError(RuntimeError):
    """A move cannot go on; the message says why (it becomes the move's ``error``)."""


class TenantMover:
    """Submits, runs and reports moves of tenants between cells."""

    def __init__(
        self,
        db: Database,
        cache: TenantCache,
        faults: Faults,
        auditor: Auditor,
        *,
        cell_list: Sequence[cells.Cell],
        plans: Plans,
        dsns: Mapping[str, str],
    ) -> None:
        self._db = db
        self._cache = cache
        self._faults = faults
        self._audit = auditor
        self._cells = tuple(cell_list)
        self._plans = plans
        self._dsns = dict(dsns)
        self._home = self._cells[0].name
        self._tasks = KeyedTasks("tenant-move")

    # The RPCs

    async def submit(self, request: pb.MoveTenantRequest) -> pb.TenantMove:
        v = Violations()
        v.identifier("tenant_id", request.tenant_id, TENANT_ID)
        if not request.request_id:
            v.add("request_id", "is required: a retry with it returns the same move")
        else:
            idempotency.check_request_id(v, request.request_id)
        names = [c.name for c in self._cells]
        if not self._dsns:
            v.add("target_cell", "no tenant can move: the registry has no TENANT_MOVER_DATABASE_URLS configured")
        elif request.target_cell not in names:
            v.add("target_cell", f"must be one of this platform's cells: {', '.join(names)}")
        v.raise_if_any()
        async with self._connect(self._home) as home, home.transaction():
            tenant = await home.fetchrow(
                "SELECT state, plan, cell FROM tenant.tenants WHERE tenant_id = $1 FOR UPDATE", request.tenant_id
            )
            if tenant is None:
                raise not_found(ErrorReason.TENANT_NOT_FOUND, request.tenant_id)
            row = await home.fetchrow(
                "SELECT * FROM tenant.tenant_moves WHERE tenant_id = $1 AND request_id = $2",
                request.tenant_id,
                request.request_id,
            )
            if row is not None:
                return move_message(row)  # a retry: the same move
            self._check_tenant(request, tenant)
            busy = await home.fetchval(
                "SELECT move_id FROM tenant.tenant_moves WHERE tenant_id = $1 AND stage = ANY($2::text[])",
                request.tenant_id,
                list(_UNFINISHED),
            )
            if busy is not None:
                raise failed_precondition(
                    f"tenant {request.tenant_id!r} is being moved already (move {busy}); wait for it (GetMove)",
                    ErrorReason.TENANT_STATE_CONFLICT,
                    state=tenant["state"],
                )
            row = await home.fetchrow(
                "INSERT INTO tenant.tenant_moves (tenant_id, move_id, request_id, source_cell, target_cell)"
                " VALUES ($1, $2, $3, $4, $5) RETURNING *",
                request.tenant_id,
                uuid.uuid4(),
                request.request_id,
                tenant["cell"] or self._home,
                request.target_cell,
            )
        assert row is not None
        move = move_message(row)
        await self._record(move.tenant_id, "tenants.move", move, {})
        self._start(move.move_id)
        return move

    def _check_tenant(self, request: pb.MoveTenantRequest, tenant: Mapping[str, Any]) -> None:
        if tenant["state"] not in MOVABLE_STATES:
            raise failed_precondition(
                f"tenant {request.tenant_id!r} is {tenant['state']}; only an ACTIVE or SUSPENDED tenant moves",
                ErrorReason.TENANT_STATE_CONFLICT,
                state=tenant["state"],
            )
        source = tenant["cell"] or self._home
        if request.target_cell == source:
            raise invalid_argument([FieldViolation("target_cell", f"the tenant is in cell {source!r} already")])
        problem = cells.placement_problem(self._cells, request.target_cell, tenant["plan"], self._plans)
        if problem:
            raise invalid_argument([FieldViolation("target_cell", problem)])

    async def get(self, move_id: str) -> pb.TenantMove:
        try:
            key = uuid.UUID(move_id)
        except ValueError:
            raise invalid_argument([FieldViolation("move_id", "must be a move_id MoveTenant returned")]) from None
        if not self._dsns:
            raise not_found(ErrorReason.MOVE_NOT_FOUND, move_id)
        async with self._connect(self._home) as home:
            row = await home.fetchrow("SELECT * FROM tenant.tenant_moves WHERE move_id = $1", key)
        if row is None:
            raise not_found(ErrorReason.MOVE_NOT_FOUND, move_id)
        return move_message(row)

    # Running

    def _start(self, move_id: str) -> None:
        self._tasks.start(move_id, self._run(move_id))

    async def resume(self) -> None:
        """At start-up: moves left unfinished by a registry that stopped are rolled back or purged."""
        if not self._dsns:
            return
        async with self._connect(self._home) as home:
            rows = await home.fetch(
                "SELECT move_id FROM tenant.tenant_moves WHERE stage = ANY($1::text[])", list(_UNFINISHED)
            )
        for row in rows:
            self._start(str(row["move_id"]))

    async def close(self) -> None:
        await self._tasks.close()

    async def _run(self, move_id: str) -> None:
        with context.bind(context.background_context("tenant", "tenant_move", f"move-{move_id}")):
            try:
                await self._drive(move_id)
            except Exception:
                log.exception("move %s stopped; it resumes when the registry starts again", move_id)

    async def _drive(self, move_id: str) -> None:
        async with self._connect(self._home) as home:
            row = await home.fetchrow("SELECT * FROM tenant.tenant_moves WHERE move_id = $1", uuid.UUID(move_id))
        assert row is not None
        tenant, source, target = row["tenant_id"], row["source_cell"], row["target_cell"]
        if row["stage"] == "SWITCHED":
            await self._purge(move_id, tenant, source)
            return
        if row["stage"] != "PENDING":  # FROZEN or COPIED: the registry stopped mid-move
            await self._roll_back(move_id, tenant, source, target, "the registry stopped during the move")
            return
        try:
            await self._freeze(move_id, tenant, source)
            copied = await self._copy(tenant, source, target)
            await self._set_stage(move_id, "COPIED", rows=copied)
            self._faults.check("tenant_move.switch")
            freeze_ms = await self._switch(move_id, tenant, target)
        except Exception as exc:
            log.warning("move %s of tenant %s failed before the switch (%s): rolling back", move_id, tenant, exc)
            await self._roll_back(move_id, tenant, source, target, _short(exc))
            return
        log.info(
            "tenant %s moved from cell %s to %s: writes refused for %.3f s (move %s)",
            tenant, source, target, freeze_ms / 1000, move_id,
        )  # fmt: skip
        await asyncio.sleep(PURGE_DELAY_SECONDS)
        await self._purge(move_id, tenant, source)

    async def _freeze(self, move_id: str, tenant: str, source: str) -> None:
        async with self._connect(source) as src:
            await src.execute(
                "INSERT INTO platform_meta.tenants_away (tenant_id) VALUES ($1)"
                " ON CONFLICT (tenant_id) DO UPDATE SET since = now()",
                tenant,
            )
            await self._set_stage(move_id, "FROZEN", frozen=True)
            # Waits for the write transactions in flight (they hold the lock shared); later ones are refused.
            async with src.transaction():
                await src.execute(f"SET LOCAL lock_timeout = '{BARRIER_TIMEOUT}'")
                await src.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", TENANT_MOVE_LOCK, tenant)

    async def _copy(self, tenant: str, source: str, target: str) -> dict[str, int]:
        """Every row of :data:`MOVED` into the target, verified, in one transaction; the rows per table."""
        buffers: dict[str, tuple[list[str], io.BytesIO]] = {}
        counts: dict[str, int] = {}
        async with self._connect(source) as src, src.transaction(isolation="repeatable_read", readonly=True):
            for table in MOVED:
                names = await columns(src, table)
                buffer = io.BytesIO()
                await src.copy_from_query(
                    f"SELECT {', '.join(names)} FROM {table} WHERE tenant_id = $1",
                    tenant,
                    output=buffer,
                    format="binary",
                )
                buffer.seek(0)
                buffers[table] = (names, buffer)
                counts[table] = await src.fetchval(f"SELECT count(*) FROM {table} WHERE tenant_id = $1", tenant)
        async with self._connect(target) as dst, dst.transaction():
            # Moving back to a cell it left before: its away row goes with the copy.
            await dst.execute("DELETE FROM platform_meta.tenants_away WHERE tenant_id = $1", tenant)
            for table in MOVED:
                if await dst.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table} WHERE tenant_id = $1)", tenant):
                    raise MoveFailedError(f"cell {target!r} holds rows of the tenant in {table} already")
                written, buffer = buffers[table]
                schema, name = table.split(".")
                await dst.copy_to_table(name, schema_name=schema, columns=written, source=buffer, format="binary")
                held = await dst.fetchval(f"SELECT count(*) FROM {table} WHERE tenant_id = $1", tenant)
                if held != counts[table]:
                    raise MoveFailedError(f"{table}: {held} rows in cell {target!r}, {counts[table]} in {source!r}")
            check = await _chain(dst, tenant)
            if not check.valid:
                raise MoveFailedError(f"the audit chain does not verify in cell {target!r} at {check.first_invalid}")
            self._faults.check("tenant_move.copy")
        return counts

    async def _switch(self, move_id: str, tenant: str, target: str) -> int:
        """The tenant's cell is the target from this commit on; published. The freeze's length, in ms."""
        async with self._connect(self._home) as home:
            async with home.transaction():
                await home.execute(
                    "UPDATE tenant.tenants SET cell = $2, version = version + 1, update_time = now()"
                    " WHERE tenant_id = $1",
                    tenant,
                    None if target == self._home else target,
                )
                freeze_ms: int = await home.fetchval(
                    "UPDATE tenant.tenant_moves SET stage = 'SWITCHED', update_time = now(),"
                    " freeze_ms = (extract(epoch FROM clock_timestamp() - frozen_at) * 1000)::bigint"
                    " WHERE move_id = $1 RETURNING freeze_ms",
                    uuid.UUID(move_id),
                )
            row = await home.fetchrow("SELECT * FROM tenant.tenants WHERE tenant_id = $1", tenant)
        assert row is not None
        await records.publish(self._cache, row)
        return freeze_ms

    async def _purge(self, move_id: str, tenant: str, source: str) -> None:
        await self._delete_rows(source, tenant)
        move = await self._set_stage(move_id, "DONE")
        await self._record(tenant, "tenants.moved", move, {"freeze_ms": move.freeze_duration.ToMilliseconds()})

    async def _roll_back(self, move_id: str, tenant: str, source: str, target: str, error: str) -> None:
        await self._delete_rows(target, tenant)
        async with self._connect(source) as src:
            await src.execute("DELETE FROM platform_meta.tenants_away WHERE tenant_id = $1", tenant)
        move = await self._set_stage(move_id, "ROLLED_BACK", error=error)
        await self._record(tenant, "tenants.move_rolled_back", move, {"error": error})

    async def _delete_rows(self, cell: str, tenant: str) -> None:
        """Every row of :data:`MOVED` of ``tenant`` in ``cell``, in one transaction."""
        async with self._connect(cell) as conn, conn.transaction():
            # Audit events are append-only but for the retention role (its policy and trigger).
            await conn.execute("SET LOCAL ROLE audit_retention")
            await conn.execute("DELETE FROM audit.events WHERE tenant_id = $1", tenant)
            await conn.execute("RESET ROLE")
            for table in reversed(MOVED):
                if table != AUDIT_EVENTS:
                    await conn.execute(f"DELETE FROM {table} WHERE tenant_id = $1", tenant)

    async def _set_stage(
        self, move_id: str, stage: str, *, error: str = "", rows: dict[str, int] | None = None, frozen: bool = False
    ) -> pb.TenantMove:
        async with self._connect(self._home) as home:
            row = await home.fetchrow(
                "UPDATE tenant.tenant_moves SET stage = $2, error = $3, rows = coalesce($4::jsonb, rows),"
                " frozen_at = CASE WHEN $5 THEN clock_timestamp() ELSE frozen_at END, update_time = now()"
                " WHERE move_id = $1 RETURNING *",
                uuid.UUID(move_id),
                stage,
                error,
                rows,
                frozen,
            )
        assert row is not None
        return move_message(row)

    async def _record(self, tenant: str, action: str, move: pb.TenantMove, details: dict[str, Any]) -> None:
        """The tenant's audit event, through the registry's outbox (delivered once the tenant takes writes)."""
        with context.platform_scope(tenant, action):
            async with self._db.transaction() as conn:
                await self._audit.record(
                    conn,
                    action,
                    f"moves/{move.move_id}",
                    {"source_cell": move.source_cell, "target_cell": move.target_cell, **details},
                )

    @asynccontextmanager
    async def _connect(self, cell: str) -> Any:
        conn: asyncpg.Connection[Any] = await asyncpg.connect(self._dsns[cell])
        try:
            await init_connection(conn)  # JSON as Python values, as every service reads it
            yield conn
        finally:
            await conn.close()


async def columns(conn: asyncpg.Connection[Any], table: str) -> list[str]:
    """The columns of ``table`` a copy writes (not the generated ones), in their order."""
    rows = await conn.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped"
        " AND attgenerated = '' ORDER BY attnum",
        table,
    )
    return [row["attname"] for row in rows]


async def _chain(conn: asyncpg.Connection[Any], tenant: str) -> ChainCheck:
    check = ChainCheck()
    check.feed([convert.chained_from_row(row) for row in await conn.fetch(audit_queries.CHAIN, tenant)])
    return check


def move_message(row: Mapping[str, Any]) -> pb.TenantMove:
    move = pb.TenantMove(
        move_id=str(row["move_id"]),
        tenant_id=row["tenant_id"],
        source_cell=row["source_cell"],
        target_cell=row["target_cell"],
        stage=pb.TenantMove.Stage.Value(f"STAGE_{row['stage']}"),
        error=row["error"],
    )
    for table, count in row["rows"].items():
        move.rows[table] = int(count)
    if row["freeze_ms"] is not None:
        move.freeze_duration.CopyFrom(duration_pb2.Duration())
        move.freeze_duration.FromTimedelta(timedelta(milliseconds=row["freeze_ms"]))
    move.create_time.FromDatetime(row["create_time"])
    move.update_time.FromDatetime(row["update_time"])
    return move


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]
