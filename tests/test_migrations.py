"""Versioned migrations: applied once, in a transaction each, never edited after the fact.

Each test migrates a throwaway service (its own schema and ``<service>_owner`` /
``<service>_app`` roles) and drops all of it afterwards.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from deploy.local.dsn import runtime_dsn
from deploy.local.stack import service_spec
from services.runtime import migrations
from services.runtime.guard import check_isolation
from services.runtime.migrations import MigrationError

PASSWORD = "mtest-only"

CREATE_ITEMS = """
CREATE TABLE items (
    tenant_id text NOT NULL,
    item_id   text NOT NULL,
    PRIMARY KEY (tenant_id, item_id)
);
ALTER TABLE items ENABLE ROW LEVEL SECURITY;
ALTER TABLE items FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON items
    USING (tenant_id = current_setting('app.current_tenant_id', true))
    WITH CHECK (tenant_id = current_setting('app.current_tenant_id', true));
GRANT SELECT, INSERT ON items TO {app};
"""

ADD_LABEL = "ALTER TABLE items ADD COLUMN label text NOT NULL DEFAULT '';\n"


@dataclass
class Throwaway:
    service: str
    admin_dsn: str
    directory: Path
    admin: asyncpg.Connection[Any]

    @property
    def schema(self) -> str:
        return self.service

    @property
    def owner(self) -> str:
        return f"{self.service}_owner"

    @property
    def app(self) -> str:
        return f"{self.service}_app"

    def write(self, name: str, sql: str) -> Path:
        path = self.directory / name
        path.write_text(sql.format(app=self.app))
        return path

    async def migrate(self) -> list[int]:
        return await migrations.migrate(self.admin_dsn, self.service, self.schema, self.directory, PASSWORD)

    async def recorded(self) -> list[tuple[int, str]]:
        rows = await self.admin.fetch(
            "SELECT version, name FROM platform_meta.schema_migrations WHERE service = $1 ORDER BY version",
            self.service,
        )
        return [(r["version"], r["name"]) for r in rows]

    async def tables(self) -> list[str]:
        rows = await self.admin.fetch(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = $1 AND c.relkind = 'r' ORDER BY 1",
            self.schema,
        )
        return [r["relname"] for r in rows]

    async def columns(self, table: str) -> list[str]:
        rows = await self.admin.fetch(
            "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped "
            "ORDER BY attnum",
            f"{self.schema}.{table}",
        )
        return [r["attname"] for r in rows]


@pytest.fixture
async def mtest(admin_dsn: str, tmp_path: Path) -> AsyncIterator[Throwaway]:
    service = f"mtest_{uuid.uuid4().hex[:8]}"
    directory = tmp_path / "migrations"
    directory.mkdir()
    admin: asyncpg.Connection[Any] = await asyncpg.connect(admin_dsn)
    made = Throwaway(service, admin_dsn, directory, admin)
    try:
        yield made
    finally:
        try:
            await admin.execute(f"DROP SCHEMA IF EXISTS {made.schema} CASCADE")
            await admin.execute("DELETE FROM platform_meta.schema_migrations WHERE service = $1", service)
            for role in (made.app, made.owner):
                if await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                    await admin.execute(f"DROP OWNED BY {role}")
                    await admin.execute(f"DROP ROLE {role}")
            assert (
                await admin.fetchval(
                    "SELECT count(*) FROM pg_roles WHERE rolname = ANY($1::text[])", [made.app, made.owner]
                )
                == 0
            )
        finally:
            await admin.close()


async def test_apply_then_idempotent(mtest):
    mtest.write("0001_items.sql", CREATE_ITEMS)
    mtest.write("0002_label.sql", ADD_LABEL)
    assert await mtest.migrate() == [1, 2]
    assert await mtest.recorded() == [(1, "items"), (2, "label")]
    assert await mtest.tables() == ["items"]
    assert await mtest.columns("items") == ["tenant_id", "item_id", "label"]
    checksums = await mtest.admin.fetch(
        "SELECT checksum FROM platform_meta.schema_migrations WHERE service = $1 ORDER BY version", mtest.service
    )
    # The stored checksum is the file's, so editing the file is noticed.
    loaded = migrations.load(mtest.directory)
    assert [r["checksum"] for r in checksums] == [m.checksum for m in loaded]

    # Second run: nothing to do, nothing re-run (re-running 0001 would fail: the table exists).
    assert await mtest.migrate() == []
    assert await mtest.recorded() == [(1, "items"), (2, "label")]

    # A new file is applied on its own.
    mtest.write("0003_more.sql", "CREATE TABLE more (tenant_id text NOT NULL);\n")
    assert await mtest.migrate() == [3]
    assert await mtest.tables() == ["items", "more"]


async def test_roles_schema_and_ownership(mtest):
    mtest.write("0001_items.sql", CREATE_ITEMS)
    await mtest.migrate()
    roles = {
        r["rolname"]: r
        for r in await mtest.admin.fetch(
            "SELECT rolname, rolcanlogin, rolsuper, rolbypassrls, rolcreatedb, rolcreaterole FROM pg_roles "
            "WHERE rolname = ANY($1::text[])",
            [mtest.owner, mtest.app],
        )
    }
    assert roles[mtest.owner]["rolcanlogin"] is False
    assert roles[mtest.app]["rolcanlogin"] is True
    for role in roles.values():
        assert (
            not role["rolsuper"] and not role["rolbypassrls"] and not role["rolcreatedb"] and not role["rolcreaterole"]
        )
    assert (
        await mtest.admin.fetchval("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = $1", mtest.schema)
        == mtest.owner
    )
    # The migration ran as the owner role, so the owner (not the admin) owns the table.
    assert (
        await mtest.admin.fetchval(
            "SELECT relowner::regrole::text FROM pg_class WHERE oid = $1::regclass", f"{mtest.schema}.items"
        )
        == mtest.owner
    )

    # The freshly migrated service passes the isolation guard as its runtime role...
    conn: asyncpg.Connection[Any] = await asyncpg.connect(runtime_dsn(mtest.admin_dsn, mtest.service, PASSWORD))
    try:
        assert await conn.fetchval("SELECT current_user") == mtest.app
        await check_isolation(conn, mtest.schema)
        # ...and cannot reach the bookkeeping.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT * FROM platform_meta.schema_migrations")
    finally:
        await conn.close()


async def test_runtime_role_limits_are_reasserted(mtest):
    mtest.write("0001_items.sql", CREATE_ITEMS)
    await mtest.migrate()
    await mtest.admin.execute(f"ALTER ROLE {mtest.app} BYPASSRLS CREATEDB")
    assert await mtest.migrate() == []
    role = await mtest.admin.fetchrow("SELECT rolbypassrls, rolcreatedb FROM pg_roles WHERE rolname = $1", mtest.app)
    assert role["rolbypassrls"] is False
    assert role["rolcreatedb"] is False


async def test_edited_migration_is_refused(mtest):
    first = mtest.write("0001_items.sql", CREATE_ITEMS)
    assert await mtest.migrate() == [1]
    first.write_text(first.read_text() + "-- a harmless-looking comment\n")
    mtest.write("0002_label.sql", ADD_LABEL)
    with pytest.raises(MigrationError, match=r"0001_items was edited after it was applied"):
        await mtest.migrate()
    # Nothing after the edited file was applied either.
    assert await mtest.recorded() == [(1, "items")]
    assert await mtest.columns("items") == ["tenant_id", "item_id"]


async def test_failing_migration_leaves_nothing(mtest):
    mtest.write("0001_items.sql", CREATE_ITEMS)
    bad = mtest.write(
        "0002_broken.sql",
        "CREATE TABLE half_done (tenant_id text NOT NULL);\n"
        "ALTER TABLE items ADD COLUMN label text;\n"
        "SELECT no_such_function();\n",
    )
    mtest.write("0003_after.sql", "CREATE TABLE after_broken (tenant_id text NOT NULL);\n")
    with pytest.raises(MigrationError, match=r"0002_broken: .*no_such_function"):
        await mtest.migrate()
    # 0001 is committed; 0002 rolled back as a whole; 0003 never ran.
    assert await mtest.recorded() == [(1, "items")]
    assert await mtest.tables() == ["items"]
    assert await mtest.columns("items") == ["tenant_id", "item_id"]

    # The connection's advisory lock was released: a fixed file applies on the next run.
    bad.write_text("ALTER TABLE items ADD COLUMN label text;\n")
    assert await mtest.migrate() == [2, 3]
    assert await mtest.recorded() == [(1, "items"), (2, "broken"), (3, "after")]
    assert await mtest.tables() == ["after_broken", "items"]


async def test_migration_runs_as_owner_not_admin(mtest):
    """SET LOCAL ROLE owner: a migration cannot do what only the superuser may."""
    mtest.write("0001_items.sql", CREATE_ITEMS)
    mtest.write("0002_superuser.sql", f"ALTER ROLE {mtest.app} BYPASSRLS;\n")
    with pytest.raises(MigrationError, match=r"0002_superuser: .*permission denied"):
        await mtest.migrate()
    assert await mtest.recorded() == [(1, "items")]
    assert await mtest.admin.fetchval("SELECT rolbypassrls FROM pg_roles WHERE rolname = $1", mtest.app) is False


@pytest.mark.parametrize("name", ["1_items.sql", "0001-items.sql", "0001_Items.sql", "00001_items.sql", "0001_.sql"])
async def test_badly_named_file_is_refused(mtest, name):
    mtest.write("0001_items.sql", CREATE_ITEMS)
    mtest.write(name, "CREATE TABLE never (tenant_id text);\n")
    with pytest.raises(MigrationError, match=r"named NNNN_name\.sql"):
        await mtest.migrate()
    assert await mtest.recorded() == []
    assert await mtest.tables() == []


async def test_duplicate_version_is_refused(mtest):
    mtest.write("0001_items.sql", CREATE_ITEMS)
    mtest.write("0001_other.sql", "CREATE TABLE other (tenant_id text);\n")
    with pytest.raises(MigrationError, match="share a version number"):
        await mtest.migrate()
    assert await mtest.recorded() == []


async def test_bad_service_name_is_refused(admin_dsn, tmp_path):
    with pytest.raises(MigrationError, match="not a plain identifier"):
        await migrations.migrate(admin_dsn, "x; DROP TABLE sites.sites; --", "sites", tmp_path, PASSWORD)
    with pytest.raises(MigrationError, match="not a plain identifier"):
        await migrations.migrate(admin_dsn, "mtest_ok", 'Sites"', tmp_path, PASSWORD)


async def test_concurrent_runs_apply_once(mtest):
    mtest.write("0001_items.sql", CREATE_ITEMS)
    mtest.write("0002_label.sql", ADD_LABEL)
    results = await asyncio.gather(*(mtest.migrate() for _ in range(4)))
    # The advisory lock serialises them: exactly one applies, the others find nothing to do.
    assert sorted(results) == [[], [], [], [1, 2]]
    assert await mtest.recorded() == [(1, "items"), (2, "label")]


async def test_sites_migrations_are_recorded(admin_dsn, stack):
    """The session's real service was migrated through the same code."""
    spec = service_spec("sites")
    conn: asyncpg.Connection[Any] = await asyncpg.connect(admin_dsn)
    try:
        rows = await conn.fetch(
            "SELECT version, checksum FROM platform_meta.schema_migrations WHERE service = 'sites' ORDER BY version"
        )
    finally:
        await conn.close()
    assert [(r["version"], r["checksum"]) for r in rows] == [
        (m.version, m.checksum) for m in migrations.load(spec.migrations_dir)
    ]
    assert await migrations.migrate(admin_dsn, "sites", "sites", spec.migrations_dir, stack.app_db_password) == []


async def test_shared_outbox_is_applied_once_into_every_service_schema(admin):
    booked = {
        row["service"]
        for row in await admin.fetch("SELECT service FROM platform_meta.schema_migrations WHERE service LIKE '%+%'")
    }
    assert {"tenant+audit_outbox", "sites+audit_outbox", "audit+audit_outbox"} <= booked
    for service in ("tenant", "sites", "audit"):
        owner = await admin.fetchval(
            "SELECT tableowner FROM pg_tables WHERE schemaname = $1 AND tablename = 'audit_outbox'", service
        )
        assert owner == f"{service}_owner"
        # The template's role placeholder became this service's runtime role, and no other.
        can_insert = await admin.fetchval(
            "SELECT has_table_privilege($1, $2, 'INSERT')", f"{service}_app", f"{service}.audit_outbox"
        )
        assert can_insert
        others = [other for other in ("tenant", "sites", "audit") if other != service]
        for other in others:
            assert not await admin.fetchval(
                "SELECT has_table_privilege($1, $2, 'INSERT')", f"{other}_app", f"{service}.audit_outbox"
            )
