"""Versioned SQL migrations, one folder per service, each applied once in a transaction.

Run with the administrative DSN. For service ``sites`` it makes sure of:
- role ``sites_owner`` (NOLOGIN) that owns schema ``sites`` and everything in it;
- role ``sites_app`` (LOGIN, NOSUPERUSER, NOBYPASSRLS, NOREPLICATION, owns nothing) that the service runs as;
- the files ``services/sites/migrations/NNNN_name.sql`` applied in order as ``sites_owner``.

Tables every service of a kind needs (the audit outbox) are written once, as shared
components under ``services/runtime/sql/<component>/``, and applied into each service's
schema before its own files, with ``{{app_role}}`` standing for its runtime role.

Bookkeeping lives in ``platform_meta.schema_migrations``, outside every service schema and
out of the runtime roles' reach (a shared component is booked as ``<service>+<component>``).
An applied file whose text changed is refused.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

log = logging.getLogger("towerco.migrations")

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
#: The one definition of tenant isolation, called by migrations for every tenant table:
#: ENABLE and FORCE row-level security, and the policy that shows and accepts only rows of
#: the tenant bound to the transaction (none when no tenant is bound).
ISOLATE_BY_TENANT = """
CREATE OR REPLACE FUNCTION platform_meta.isolate_by_tenant(tbl regclass) RETURNS void
LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog AS $fn$
BEGIN
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', tbl);
    EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', tbl);
    EXECUTE format(
        'CREATE POLICY tenant_isolation ON %s'
        ' USING (tenant_id = current_setting(''app.current_tenant_id'', true))'
        ' WITH CHECK (tenant_id = current_setting(''app.current_tenant_id'', true))',
        tbl);
END
$fn$;
REVOKE ALL ON FUNCTION platform_meta.isolate_by_tenant(regclass) FROM PUBLIC;
"""
#: The write barrier of a tenant moving out of a cell (services/tenant/tenant_move.py): every
#: write transaction of a tenant's rows calls ``require_writable(tenant)`` with its BEGIN
#: (services/runtime/db.py). It takes a shared per-tenant advisory lock without waiting, so
#: the mover, taking it exclusively, waits for the writes in flight while a new writer is
#: refused at once rather than queued behind it; then, in a statement of its own (a snapshot
#: taken after the lock), it refuses a tenant listed in ``tenants_away``: the row the mover
#: commits on the source before the barrier, kept after the move (a process whose cache still
#: names the source cell has its writes refused, to retry, never written there). SQLSTATE
#: TM001: the service answers UNAVAILABLE TENANT_MOVING. The runtime roles may run the
#: function but not read or change the table.
TENANT_MOVE_LOCK = 0x544D4F56  # b"TMOV": (this, hashtext(tenant))
TENANTS_AWAY = f"""
CREATE TABLE IF NOT EXISTS platform_meta.tenants_away (
    tenant_id text PRIMARY KEY,
    since timestamptz NOT NULL DEFAULT now());
CREATE OR REPLACE FUNCTION platform_meta.require_writable(tenant text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog AS $fn$
BEGIN
    IF NOT pg_try_advisory_xact_lock_shared({TENANT_MOVE_LOCK}, hashtext(tenant)) THEN
        RAISE EXCEPTION 'tenant % is moving to another cell', tenant USING ERRCODE = 'TM001';
    END IF;
    IF EXISTS (SELECT 1 FROM platform_meta.tenants_away WHERE tenant_id = tenant) THEN
        RAISE EXCEPTION 'tenant % is moving or has moved to another cell', tenant USING ERRCODE = 'TM001';
    END IF;
END
$fn$;
REVOKE ALL ON FUNCTION platform_meta.require_writable(text) FROM PUBLIC;
"""
#: Shared components: ``services/runtime/sql/<component>/NNNN_name.sql``.
SHARED = Path(__file__).parent / "sql"
_LOCK_KEY = 0x7077E2C0  # one advisory lock for all migrations of the platform


class MigrationError(RuntimeError):
    """A migration could not be applied, or an applied one was edited."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load(directory: Path) -> list[Migration]:
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE.match(path.name)
        if not match:
            raise MigrationError(f"{path}: migration files are named NNNN_name.sql")
        found.append(Migration(int(match.group(1)), match.group(2), path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"{directory}: two migrations share a version number")
    return found


def _ident(name: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise MigrationError(f"not a plain identifier: {name!r}")
    return name


async def migrate(
    admin_dsn: str,
    service: str,
    schema: str,
    directory: Path,
    app_password: str | None,
    components: Sequence[str] = (),
) -> list[int]:
    """Apply pending migrations of one service (shared ``components`` first); returns the versions applied now.

    ``app_password`` becomes the runtime role's password; None leaves it as it is (e.g. certificate login).
    """
    owner, app, schema = _ident(f"{service}_owner"), _ident(f"{service}_app"), _ident(schema)
    pending = load(directory)  # a badly named file stops us before anything is created
    shared = {name: load(SHARED / _ident(name)) for name in components}
    conn: asyncpg.Connection[Any] = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            await _ensure_roles_and_schema(conn, owner, app, schema, app_password)
            for name, files in shared.items():
                instances = [Migration(m.version, m.name, m.sql.replace("{{app_role}}", app)) for m in files]
                await _apply(conn, f"{service}+{name}", owner, schema, instances, checksums=files)
            return await _apply(conn, service, owner, schema, pending)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await conn.close()


async def _ensure_roles_and_schema(
    conn: asyncpg.Connection[Any], owner: str, app: str, schema: str, app_password: str | None
) -> None:
    async with conn.transaction():
        await conn.execute("CREATE SCHEMA IF NOT EXISTS platform_meta")
        await conn.execute("REVOKE ALL ON SCHEMA platform_meta FROM PUBLIC")
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS platform_meta.schema_migrations (
                   service text NOT NULL,
                   version integer NOT NULL,
                   name text NOT NULL,
                   checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now(),
                   PRIMARY KEY (service, version))"""
        )
        await conn.execute(ISOLATE_BY_TENANT)
        await conn.execute(TENANTS_AWAY)
        if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", owner):
            await conn.execute(f"CREATE ROLE {owner} NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE")
        if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", app):
            await conn.execute(
                f"CREATE ROLE {app} LOGIN NOSUPERUSER NOBYPASSRLS NOREPLICATION NOCREATEDB NOCREATEROLE NOINHERIT"
            )
        # Re-assert the runtime role's limits every time: nobody widens them by hand unnoticed.
        password = "" if app_password is None else await conn.fetchval("SELECT quote_literal($1)", app_password)
        await conn.execute(
            f"ALTER ROLE {app} LOGIN NOSUPERUSER NOBYPASSRLS NOREPLICATION NOCREATEDB NOCREATEROLE"
            + (f" PASSWORD {password}" if password else "")
        )
        # Migrations (run as the owner) call platform_meta.isolate_by_tenant('<table>').
        await conn.execute(f"GRANT USAGE ON SCHEMA platform_meta TO {owner}")
        await conn.execute(f"GRANT EXECUTE ON FUNCTION platform_meta.isolate_by_tenant(regclass) TO {owner}")
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {owner}")
        await conn.execute(f"REVOKE ALL ON SCHEMA {schema} FROM PUBLIC")
        await conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO {app}")
        await conn.execute(f"GRANT USAGE ON SCHEMA platform_meta TO {app}")
        await conn.execute(f"GRANT EXECUTE ON FUNCTION platform_meta.require_writable(text) TO {app}")
        database = await conn.fetchval("SELECT current_database()")
        await conn.execute(f'GRANT CONNECT ON DATABASE "{database}" TO {app}')


async def _apply(
    conn: asyncpg.Connection[Any],
    service: str,
    owner: str,
    schema: str,
    migrations: list[Migration],
    checksums: list[Migration] | None = None,
) -> list[int]:
    """Apply what is not booked yet; ``checksums`` are the files as written (shared templates)."""
    written = {m.version: m.checksum for m in (checksums or migrations)}
    applied = {
        row["version"]: row["checksum"]
        for row in await conn.fetch(
            "SELECT version, checksum FROM platform_meta.schema_migrations WHERE service = $1", service
        )
    }
    done: list[int] = []
    for migration in migrations:
        if migration.version in applied:
            if applied[migration.version] != written[migration.version]:
                raise MigrationError(
                    f"{service} migration {migration.version:04d}_{migration.name} was edited after it was applied; "
                    "add a new migration instead"
                )
            continue
        async with conn.transaction():
            await conn.execute(f"SET LOCAL ROLE {owner}")
            await conn.execute(f"SET LOCAL search_path = {schema}")
            try:
                await conn.execute(migration.sql)
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"{service} migration {migration.version:04d}_{migration.name}: {exc}") from exc
            await conn.execute("RESET ROLE")
            await conn.execute(
                "INSERT INTO platform_meta.schema_migrations (service, version, name, checksum)"
                " VALUES ($1, $2, $3, $4)",
                service,
                migration.version,
                migration.name,
                written[migration.version],
            )
        log.info("applied %s migration %04d_%s", service, migration.version, migration.name)
        done.append(migration.version)
    return done
