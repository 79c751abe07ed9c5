"""The start-up isolation guard refuses every configuration under which RLS could be bypassed."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from deploy.local.dsn import dsn_with_user
from services.runtime.guard import IsolationError, check_isolation


def dsn_as(admin_dsn: str, user: str) -> str:
    return dsn_with_user(admin_dsn, user, "throwaway")


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


class Throwaways:
    """Roles and schemas made for one test and dropped after it."""

    def __init__(self, admin: asyncpg.Connection[Any], admin_dsn: str) -> None:
        self.admin = admin
        self.admin_dsn = admin_dsn
        self.roles: list[str] = []
        self.schemas: list[str] = []
        self.conns: list[asyncpg.Connection[Any]] = []

    async def role(self, prefix: str, attributes: str = "LOGIN") -> str:
        name = unique(prefix)
        await self.admin.execute(f"CREATE ROLE {name} {attributes}")
        self.roles.append(name)
        return name

    async def schema(self, prefix: str) -> str:
        name = unique(prefix)
        await self.admin.execute(f"CREATE SCHEMA {name}")
        self.schemas.append(name)
        return name

    async def connect(self, role: str) -> asyncpg.Connection[Any]:
        conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn_as(self.admin_dsn, role))
        self.conns.append(conn)
        assert await conn.fetchval("SELECT current_user") == role
        return conn

    async def drop(self) -> None:
        for conn in self.conns:
            await conn.close()
        for schema in self.schemas:
            await self.admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        for role in reversed(self.roles):
            await self.admin.execute(f"DROP OWNED BY {role}")
            await self.admin.execute(f"DROP ROLE {role}")
        left = await self.admin.fetchval("SELECT count(*) FROM pg_roles WHERE rolname = ANY($1::text[])", self.roles)
        assert left == 0


@pytest.fixture
async def throwaway(admin: asyncpg.Connection[Any], admin_dsn: str) -> AsyncIterator[Throwaways]:
    made = Throwaways(admin, admin_dsn)
    try:
        yield made
    finally:
        await made.drop()


async def isolation_error(conn: asyncpg.Connection[Any], schema: str) -> str:
    with pytest.raises(IsolationError) as caught:
        await check_isolation(conn, schema)
    message = str(caught.value)
    assert message.startswith("tenant isolation is not enforced: ")
    return message


async def test_runtime_role_passes(app_conn):
    assert await app_conn.fetchval("SELECT current_user") == "sites_app"
    await check_isolation(app_conn, "sites")


async def test_bypassrls_role_is_refused(throwaway, admin_dsn, tenant_pair):
    role = await throwaway.role("g_bypass", "LOGIN BYPASSRLS")
    await throwaway.admin.execute(f"GRANT USAGE ON SCHEMA sites TO {role}")
    await throwaway.admin.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA sites TO {role}")
    tenant_a, _ = tenant_pair
    await throwaway.admin.execute(
        "INSERT INTO sites.sites (tenant_id, site_id, name) VALUES ($1, 'G-1', 'guard')", tenant_a
    )
    try:
        conn = await throwaway.connect(role)
        # Why it matters: with no tenant bound, this role still reads the tenant's row.
        leaked = await conn.fetchval("SELECT count(*) FROM sites.sites WHERE tenant_id = $1", tenant_a)
        assert leaked == 1
        message = await isolation_error(conn, "sites")
        assert f"runtime role {role} has BYPASSRLS" in message
        assert "SUPERUSER" not in message
        assert "owns" not in message
    finally:
        await throwaway.admin.execute("DELETE FROM sites.sites WHERE tenant_id = $1", tenant_a)


async def test_member_of_bypassrls_role_is_refused(throwaway):
    bypass = await throwaway.role("g_bypass", "NOLOGIN BYPASSRLS")
    member = await throwaway.role("g_member")
    await throwaway.admin.execute(f"GRANT {bypass} TO {member}")
    await throwaway.admin.execute(f"GRANT USAGE ON SCHEMA sites TO {member}")
    conn = await throwaway.connect(member)
    message = await isolation_error(conn, "sites")
    assert f"runtime role {member} has BYPASSRLS through membership in {bypass}" in message


async def test_replication_role_is_refused(throwaway):
    """REPLICATION can stream the whole database past RLS: as bad as BYPASSRLS."""
    role = await throwaway.role("g_repl", "LOGIN REPLICATION")
    await throwaway.admin.execute(f"GRANT USAGE ON SCHEMA sites TO {role}")
    conn = await throwaway.connect(role)
    message = await isolation_error(conn, "sites")
    assert f"runtime role {role} has REPLICATION" in message
    assert "BYPASSRLS" not in message


async def test_superuser_is_refused(admin):
    user = await admin.fetchval("SELECT current_user")
    assert await admin.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    message = await isolation_error(admin, "sites")
    assert f"runtime role {user} has SUPERUSER" in message


async def test_member_of_owner_role_is_refused(throwaway):
    role = await throwaway.role("g_owner")
    await throwaway.admin.execute(f"GRANT sites_owner TO {role}")
    conn = await throwaway.connect(role)
    message = await isolation_error(conn, "sites")
    assert "SUPERUSER" not in message and "BYPASSRLS" not in message
    for thing in ("sites", "create_requests"):
        assert f"runtime role {role} owns (or is a member of the owner of) sites.{thing};" in message


async def test_schema_owner_is_refused(throwaway):
    """Owning the schema (not its tables) is enough to drop and replace them: refused."""
    role = await throwaway.role("g_nspowner")
    schema = await throwaway.schema("g_owned")
    await throwaway.admin.execute(
        f"""
        ALTER SCHEMA {schema} OWNER TO {role};
        CREATE TABLE {schema}.good (tenant_id text NOT NULL);
        ALTER TABLE {schema}.good ENABLE ROW LEVEL SECURITY;
        ALTER TABLE {schema}.good FORCE ROW LEVEL SECURITY;
        CREATE POLICY p ON {schema}.good USING (tenant_id = current_setting('app.current_tenant_id', true));
        """
    )
    assert (
        await throwaway.admin.fetchval(
            f"SELECT relowner::regrole::text FROM pg_class WHERE oid = '{schema}.good'::regclass"
        )
        != role
    )
    conn = await throwaway.connect(role)
    message = await isolation_error(conn, schema)
    problems = message.split(": ", 1)[1].split("; ")
    # Exactly one problem: the schema's ownership (its only table is fine and not owned).
    assert len(problems) == 1
    assert problems[0] == f"runtime role {role} owns (or is a member of the owner of) schema {schema}"
    assert "good" not in message


async def test_owner_itself_is_refused(admin):
    """Even a session that has become the owner role is caught (not only its members)."""
    async with admin.transaction():
        await admin.execute("SET LOCAL ROLE sites_owner")
        message = await isolation_error(admin, "sites")
    assert "runtime role sites_owner owns (or is a member of the owner of) sites.sites" in message
    assert "SUPERUSER" not in message


async def test_tables_without_forced_rls_are_refused(throwaway, app_conn):
    schema = await throwaway.schema("g_schema")
    policy = "CREATE POLICY p ON {t} USING (tenant_id = current_setting('app.current_tenant_id', true))"
    await throwaway.admin.execute(
        f"""
        CREATE TABLE {schema}.enabled_only (tenant_id text NOT NULL);
        ALTER TABLE {schema}.enabled_only ENABLE ROW LEVEL SECURITY;
        {policy.format(t=f"{schema}.enabled_only")};
        CREATE TABLE {schema}.no_rls (tenant_id text NOT NULL);
        CREATE TABLE {schema}.forced_no_policy (tenant_id text NOT NULL);
        ALTER TABLE {schema}.forced_no_policy ENABLE ROW LEVEL SECURITY;
        ALTER TABLE {schema}.forced_no_policy FORCE ROW LEVEL SECURITY;
        CREATE TABLE {schema}.good (tenant_id text NOT NULL);
        ALTER TABLE {schema}.good ENABLE ROW LEVEL SECURITY;
        ALTER TABLE {schema}.good FORCE ROW LEVEL SECURITY;
        {policy.format(t=f"{schema}.good")};
        """
    )
    message = await isolation_error(app_conn, schema)
    problems = set(message.split(": ", 1)[1].split("; "))
    assert problems == {
        f"{schema}.enabled_only does not FORCE ROW LEVEL SECURITY",
        f"{schema}.no_rls does not ENABLE ROW LEVEL SECURITY",
        f"{schema}.no_rls does not FORCE ROW LEVEL SECURITY",
        f"{schema}.no_rls has no row-level security policy",
        f"{schema}.forced_no_policy has no row-level security policy",
    }
    assert "good" not in message
    assert "runtime role" not in message


async def test_table_with_rls_in_partition_is_checked(throwaway, app_conn):
    schema = await throwaway.schema("g_part")
    await throwaway.admin.execute(
        f"""
        CREATE TABLE {schema}.parent (tenant_id text NOT NULL) PARTITION BY LIST (tenant_id);
        ALTER TABLE {schema}.parent ENABLE ROW LEVEL SECURITY;
        ALTER TABLE {schema}.parent FORCE ROW LEVEL SECURITY;
        CREATE POLICY p ON {schema}.parent USING (tenant_id = current_setting('app.current_tenant_id', true));
        CREATE TABLE {schema}.part_a PARTITION OF {schema}.parent FOR VALUES IN ('aaa');
        """
    )
    message = await isolation_error(app_conn, schema)
    # The partition can be queried directly, bypassing the parent's policies.
    assert f"{schema}.part_a does not ENABLE ROW LEVEL SECURITY" in message
    assert f"{schema}.parent" not in message


async def test_materialized_view_is_refused(throwaway, app_conn):
    """A materialized view cannot have RLS at all: in a service schema it is a hole."""
    schema = await throwaway.schema("g_mv")
    await throwaway.admin.execute(
        f"""
        CREATE TABLE {schema}.good (tenant_id text NOT NULL);
        ALTER TABLE {schema}.good ENABLE ROW LEVEL SECURITY;
        ALTER TABLE {schema}.good FORCE ROW LEVEL SECURITY;
        CREATE POLICY p ON {schema}.good USING (tenant_id = current_setting('app.current_tenant_id', true));
        CREATE MATERIALIZED VIEW {schema}.everyone AS SELECT tenant_id FROM {schema}.good;
        """
    )
    message = await isolation_error(app_conn, schema)
    assert f"{schema}.everyone does not ENABLE ROW LEVEL SECURITY" in message
    assert f"{schema}.good" not in message


async def test_empty_schema_is_refused(throwaway, app_conn):
    schema = await throwaway.schema("g_empty")
    message = await isolation_error(app_conn, schema)
    assert f"schema {schema} has no tables" in message
    missing = unique("g_missing")
    message = await isolation_error(app_conn, missing)
    assert f"schema {missing} has no tables" in message


# --- The service process itself refuses to start ---------------------------------------


async def test_service_refuses_to_start_with_bypassrls_role(stack, throwaway, extra_sites):
    role = await throwaway.role("g_svc", "LOGIN BYPASSRLS")
    await throwaway.admin.execute(f"GRANT USAGE ON SCHEMA sites TO {role}")
    await throwaway.admin.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA sites TO {role}")
    extra = extra_sites({"SITES_DATABASE_URL": dsn_as(stack.database_url, role)}, wait=False)
    code = extra.process.wait(timeout=60)
    output = extra.output()
    assert code != 0, output
    assert "tenant isolation is not enforced" in output, output
    assert f"runtime role {role} has BYPASSRLS" in output, output
    assert "serving on" not in output
