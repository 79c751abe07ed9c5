"""Tenant data migration: copy chosen data types from one tenant into another.

One ``migration_id`` drives every part. First every part checks for conflicts, and
any conflict fails the migration before anything is written. Then each part copies,
in the order requested, through the owning service (its internal TenantDataService;
the registry's own ``settings`` part runs here). If a part fails, the parts already
done are undone, so no row of the migration remains in the target. A migration left
running by a process that died is taken over by another once that process's
lease expires: undone, then run again. Every step is idempotent.

A tenant data migration moves one tenant's rows into another; it is not a schema migration
(those are the services' ``migrations/`` directories, applied by ``services/runtime/migrations.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

import asyncpg
import grpc
from towerco.internal.v1 import tenant_data_pb2 as internal_pb
from towerco.internal.v1 import tenant_data_pb2_grpc as internal_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as pb

from services.runtime import context, idempotency
from services.runtime.audit import Auditor
from services.runtime.db import Database
from services.runtime.errors import ErrorReason, FieldViolation, failed_precondition, invalid_argument, not_found
from services.runtime.faults import Faults
from services.runtime.ids import TENANT_ID
from services.runtime.tasks import KeyedTasks
from services.runtime.tenant_cache import TenantCache
from services.runtime.validation import Violations

from . import queries, records, tenant_settings_store
from .secrets import SecretBox

log = logging.getLogger("towerco.tenant.migration")


class Part(Protocol):
    """One data type's share of a migration, done by the service that owns that data."""

    async def prepare(self, migration_id: str, source: str, target: str) -> list[str]:
        """The ids in the way (empty: the copy can go ahead). Writes nothing."""

    async def apply(self, migration_id: str, source: str, target: str) -> int: ...

    async def undo(self, migration_id: str, target: str) -> int: ...


class RemotePart:
    """A part owned by another service, through its internal TenantDataService."""

    def __init__(self, data_type: str, stub: internal_grpc.TenantDataServiceAsyncStub, timeout: float = 60.0) -> None:
        self._type = data_type
        self._stub = stub
        self._timeout = timeout

    async def prepare(self, migration_id: str, source: str, target: str) -> list[str]:
        reply = await self._stub.PrepareTenantMigration(
            internal_pb.PrepareTenantMigrationRequest(
                migration_id=migration_id, source_tenant_id=source, target_tenant_id=target, data_type=self._type
            ),
            timeout=self._timeout,
        )
        return list(reply.conflicts)

    async def apply(self, migration_id: str, source: str, target: str) -> int:
        reply = await self._stub.ApplyTenantMigration(
            internal_pb.ApplyTenantMigrationRequest(
                migration_id=migration_id, source_tenant_id=source, target_tenant_id=target, data_type=self._type
            ),
            timeout=self._timeout,
        )
        return int(reply.row_count)

    async def undo(self, migration_id: str, target: str) -> int:
        reply = await self._stub.UndoTenantMigration(
            internal_pb.UndoTenantMigrationRequest(
                migration_id=migration_id, target_tenant_id=target, data_type=self._type
            ),
            timeout=self._timeout,
        )
        return int(reply.row_count)


class SettingsPart:
    """The registry's own part: the target takes the source's settings; undo restores its own."""

    def __init__(self, db: Database, cache: TenantCache, box: SecretBox) -> None:
        self._db = db
        self._cache = cache
        self._box = box

    async def prepare(self, migration_id: str, source: str, target: str) -> list[str]:
        return []  # settings are replaced whole: nothing can be in the way

    async def apply(self, migration_id: str, source: str, target: str) -> int:
        with context.platform_scope(source, "migration.settings.read"):
            async with self._db.transaction(readonly=True) as conn:
                document = await conn.fetchval(queries.GET_SETTINGS, source)
        if document is None:
            return 0
        with context.platform_scope(target, "migration.settings.apply"):
            async with self._db.transaction() as conn:
                row = await conn.fetchrow(queries.GET_TENANT_FOR_UPDATE, target)
                if row is None:
                    raise not_found(ErrorReason.TENANT_NOT_FOUND, target)
                if await conn.fetchval(queries.GET_SETTINGS_BACKUP, target, uuid.UUID(migration_id)) is not None:
                    return 1  # this migration already replaced them
                previous = await conn.fetchval(queries.GET_SETTINGS_FOR_UPDATE, target)
                backup = previous if previous is not None else {}
                await conn.execute(queries.INSERT_SETTINGS_BACKUP, target, uuid.UUID(migration_id), backup)
                copied = tenant_settings_store.reseal(document, self._box, source, target)
                await conn.execute(queries.UPSERT_SETTINGS, target, copied)
                await conn.execute(queries.BUMP_VERSION, target)
                row = await conn.fetchrow(queries.GET_TENANT, target)
            assert row is not None
            await records.publish(self._cache, row, copied)
        return 1

    async def undo(self, migration_id: str, target: str) -> int:
        with context.platform_scope(target, "migration.settings.undo"):
            async with self._db.transaction() as conn:
                backup = await conn.fetchval(queries.GET_SETTINGS_BACKUP, target, uuid.UUID(migration_id))
                if backup is None:
                    return 0
                if backup:
                    await conn.execute(queries.UPSERT_SETTINGS, target, backup)
                else:
                    await conn.execute(queries.DELETE_SETTINGS, target)
                await conn.execute(queries.DELETE_SETTINGS_BACKUP, target, uuid.UUID(migration_id))
                await conn.execute(queries.BUMP_VERSION, target)
                row = await conn.fetchrow(queries.GET_TENANT, target)
            assert row is not None
            await records.publish(self._cache, row, backup or None)
        return 1


class MigrationRunner:
    def __init__(
        self, db: Database, faults: Faults, parts: Mapping[str, Part], auditor: Auditor, *, lease_seconds: float = 30.0
    ) -> None:
        self._db = db
        self._audit = auditor
        self._faults = faults
        self._parts = dict(parts)
        self._tasks = KeyedTasks("migration")
        self._sweeper: asyncio.Task[None] | None = None
        #: Who this process is, for the lease on the migrations it runs.
        self._owner = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self._lease = lease_seconds

    @property
    def data_types(self) -> list[str]:
        return sorted(self._parts)

    async def submit(self, request: pb.MigrateTenantDataRequest) -> pb.Migration:
        self._check(request)
        source, target = request.source_tenant_id, request.target_tenant_id
        for field, tenant_id in (("source_tenant_id", source), ("target_tenant_id", target)):
            with context.platform_scope(tenant_id, "migration.check"):
                async with self._db.transaction(readonly=True) as conn:
                    state = await conn.fetchval("SELECT state FROM tenant.tenants WHERE tenant_id = $1", tenant_id)
            if state is None:
                raise not_found(ErrorReason.TENANT_NOT_FOUND, tenant_id)
            if state != "STATE_ACTIVE":
                raise failed_precondition(
                    f"{field} {tenant_id!r} is {state}; both tenants must be STATE_ACTIVE",
                    ErrorReason.TENANT_STATE_CONFLICT,
                    state=state,
                    tenant_id=tenant_id,
                )
        owner = context.PLATFORM_TENANT  # migrations belong to the platform, whatever tenant the call names
        request_hash = idempotency.request_hash(request)
        with context.platform_scope(owner, "migration.submit"):
            row = await self._insert(request, owner, request_hash)
        migration = records.migration_from_row(row)
        if migration.state == pb.Migration.STATE_PENDING:
            self.start(migration.migration_id)
        return migration

    async def _insert(self, request: pb.MigrateTenantDataRequest, owner: str, request_hash: str) -> Any:
        async with self._db.transaction() as conn:
            row = await conn.fetchrow(
                queries.INSERT_MIGRATION,
                owner,
                uuid.uuid4(),
                request.source_tenant_id,
                request.target_tenant_id,
                list(request.data_types),
                request.request_id or None,
                request_hash,
            )
            if row is None:  # this request_id was seen before: the same migration, or a misuse
                row = await conn.fetchrow(queries.GET_MIGRATION_BY_REQUEST, owner, request.request_id)
                assert row is not None
                idempotency.check_same_request(row["request_hash"], request_hash, "migration")
            else:
                await self._audit.record(
                    conn,
                    "tenants.migrate",
                    f"migrations/{row['migration_id']}",
                    {
                        "source_tenant_id": request.source_tenant_id,
                        "target_tenant_id": request.target_tenant_id,
                        "data_types": list(request.data_types),
                    },
                )
        return row

    def _check(self, request: pb.MigrateTenantDataRequest) -> None:
        v = Violations()
        for field in ("source_tenant_id", "target_tenant_id"):
            v.identifier(field, getattr(request, field), TENANT_ID)
        if request.source_tenant_id and request.source_tenant_id == request.target_tenant_id:
            v.add("target_tenant_id", "must differ from source_tenant_id")
        if context.PLATFORM_TENANT in (request.source_tenant_id, request.target_tenant_id):
            v.add("source_tenant_id", "the platform's own tenant cannot take part in a migration")
        if not request.data_types:
            v.add("data_types", f"name at least one of {', '.join(self.data_types)}")
        seen: set[str] = set()
        for i, data_type in enumerate(request.data_types):
            if data_type not in self._parts:
                v.add(f"data_types[{i}]", f"{data_type!r} is not one of {', '.join(self.data_types)}")
            elif data_type in seen:
                v.add(f"data_types[{i}]", f"{data_type!r} is listed twice")
            seen.add(data_type)
        idempotency.check_request_id(v, request.request_id)
        v.raise_if_any()

    async def get(self, migration_id: str) -> pb.Migration:
        try:
            key = uuid.UUID(migration_id)
        except ValueError:
            raise invalid_argument(
                [FieldViolation("migration_id", "must be a migration_id MigrateTenantData returned")]
            ) from None
        with context.platform_scope(context.PLATFORM_TENANT, "migration.get"):
            async with self._db.transaction(readonly=True) as conn:
                row = await conn.fetchrow(queries.GET_MIGRATION, context.PLATFORM_TENANT, key)
        if row is None:
            raise not_found(ErrorReason.MIGRATION_NOT_FOUND, migration_id)
        return records.migration_from_row(row)

    def start(self, migration_id: str) -> None:
        self._tasks.start(migration_id, self._run(migration_id))

    async def resume(self) -> None:
        """From start-up on: take over every unfinished migration whose runner's lease expired."""
        await self._resume_once()
        self._sweeper = asyncio.create_task(self._sweep(), name="migration-sweeper")

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._lease / 2)
            try:
                await self._resume_once()
            except Exception as exc:
                log.warning("migration sweep failed (%s)", exc)

    async def _resume_once(self) -> None:
        with context.bind(context.background_context("tenant", "migration.resume", uuid.uuid4().hex)):
            async with self._db.transaction(readonly=True) as conn:
                rows = await conn.fetch(queries.UNFINISHED_MIGRATIONS, context.PLATFORM_TENANT)
        for row in rows:
            self.start(str(row["migration_id"]))  # _run claims it, or leaves it to its live owner

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self._tasks.close()

    async def _run(self, migration_id: str) -> None:
        with context.bind(context.background_context("tenant", "migration", f"migration-{migration_id}")):
            row = await self._claim(migration_id)
            if row is None:
                return  # finished, or another replica is running it
            renewing = asyncio.create_task(self._renew(migration_id), name=f"migration-lease-{migration_id}")
            try:
                await self._execute(migration_id, row)
            finally:
                renewing.cancel()

    async def _claim(self, migration_id: str) -> Any:
        async with self._db.transaction() as conn:
            return await conn.fetchrow(
                queries.CLAIM_MIGRATION, context.PLATFORM_TENANT, uuid.UUID(migration_id), self._owner, self._lease
            )

    async def _renew(self, migration_id: str) -> None:
        while True:
            await asyncio.sleep(self._lease / 3)
            try:
                if await self._claim(migration_id) is None:
                    log.warning("migration %s: lease lost to another replica", migration_id)
            except Exception as exc:
                log.warning("migration %s: could not renew its lease (%s)", migration_id, exc)

    async def _execute(self, migration_id: str, row: Any) -> None:
        source, target, data_types = row["source_tenant_id"], row["target_tenant_id"], list(row["data_types"])
        parts = [(t, self._parts[t]) for t in data_types]
        try:
            if row["state"] == "STATE_RUNNING":
                # Its previous runner (a process that died or restarted) stopped half-way:
                # start again from a clean target.
                await self._undo(migration_id, target, parts)
            await self._set(migration_id, "STATE_RUNNING", "")
            conflicts = []
            for data_type, part in parts:
                found = await part.prepare(migration_id, source, target)
                if found:
                    conflicts.append(f"{data_type}: {', '.join(found[:50])}{' …' if len(found) > 50 else ''}")
            if conflicts:
                await self._set(
                    migration_id,
                    "STATE_FAILED",
                    "nothing was copied: the target already has " + "; ".join(conflicts),
                )
                return
        except Exception as exc:
            await self._set(migration_id, "STATE_FAILED", f"nothing was copied: {_describe(exc)}")
            return
        done: list[tuple[str, Part]] = []
        for data_type, part in parts:
            try:
                done.append((data_type, part))
                self._faults.check(f"migration.{data_type}")
                count = await part.apply(migration_id, source, target)
                log.info("migration %s: %s copied %d rows", migration_id, data_type, count)
            except Exception as exc:
                error = f"copying {data_type} failed: {_describe(exc)}"
                try:
                    await self._undo(migration_id, target, done)
                except Exception as undo_exc:
                    await self._set(migration_id, "STATE_FAILED", f"{error}; undo failed: {_describe(undo_exc)}")
                    return
                await self._set(migration_id, "STATE_ROLLED_BACK", f"{error}; everything copied was removed")
                return
        await self._set(migration_id, "STATE_SUCCEEDED", "")

    async def _undo(self, migration_id: str, target: str, parts: list[tuple[str, Part]]) -> None:
        for data_type, part in reversed(parts):
            removed = await part.undo(migration_id, target)
            log.info("migration %s: %s undone, %d rows removed", migration_id, data_type, removed)

    async def _set(self, migration_id: str, state: str, error: str) -> None:
        async with self._db.transaction() as conn:
            await conn.execute(
                queries.SET_MIGRATION_STATE, context.PLATFORM_TENANT, uuid.UUID(migration_id), state, error
            )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, asyncpg.PostgresError):
        return f"database error {type(exc).__name__}"
    return str(exc)[:300] or type(exc).__name__
