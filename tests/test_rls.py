"""RLS is the net: even unfiltered SQL run as the runtime role only reaches the bound tenant.

Every statement here deliberately omits ``WHERE tenant_id = ...``: the only thing between
one tenant and another's rows is the database's row-level security, driven by the
transaction-local ``app.current_tenant_id``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from services.runtime import context
from services.runtime.context import NoTenantError, RequestContext
from services.runtime.db import BIND_TENANT, UNREACHABLE, Database, quote_literal

# The very statement Database.transaction() binds the tenant with.
BIND = BIND_TENANT


async def _seed(admin_dsn: str, rows: dict[str, list[str]]) -> None:
    """Insert sites as the superuser (bypassing RLS): {tenant: [site_id, ...]}."""
    conn: asyncpg.Connection[Any] = await asyncpg.connect(admin_dsn)
    try:
        for tenant, site_ids in rows.items():
            for site_id in site_ids:
                await conn.execute(
                    "INSERT INTO sites.sites (tenant_id, site_id, name) VALUES ($1, $2, $3)",
                    tenant,
                    site_id,
                    f"{tenant} {site_id}",
                )
    finally:
        await conn.close()


async def _admin_rows(admin_dsn: str, tenant: str) -> dict[str, str]:
    """{site_id: name} of one tenant, read as the superuser."""
    conn: asyncpg.Connection[Any] = await asyncpg.connect(admin_dsn)
    try:
        rows = await conn.fetch("SELECT site_id, name FROM sites.sites WHERE tenant_id = $1", tenant)
    finally:
        await conn.close()
    return {r["site_id"]: r["name"] for r in rows}


@pytest.fixture
async def seeded(admin_dsn: str, tenant_pair: tuple[str, str]) -> AsyncIterator[tuple[str, str]]:
    tenant_a, tenant_b = tenant_pair
    await _seed(admin_dsn, {tenant_a: ["A-1", "A-2", "SHARED"], tenant_b: ["B-1", "SHARED"]})
    yield tenant_pair
    conn: asyncpg.Connection[Any] = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute("DELETE FROM sites.sites WHERE tenant_id = ANY($1::text[])", list(tenant_pair))
    finally:
        await conn.close()


async def test_unfiltered_select_sees_only_bound_tenant(app_conn, seeded):
    _, tenant_b = seeded
    async with app_conn.transaction():
        await app_conn.execute(BIND, tenant_b)
        rows = await app_conn.fetch("SELECT * FROM sites.sites")
        count = await app_conn.fetchval("SELECT count(*) FROM sites.sites")
        shared = await app_conn.fetch("SELECT tenant_id, name FROM sites.sites WHERE site_id = 'SHARED'")
    assert {r["tenant_id"] for r in rows} == {tenant_b}
    assert sorted(r["site_id"] for r in rows) == ["B-1", "SHARED"]
    assert count == 2
    # Same site_id in both tenants: only the bound tenant's row is visible.
    assert [(r["tenant_id"], r["name"]) for r in shared] == [(tenant_b, f"{tenant_b} SHARED")]


async def test_unfiltered_update_touches_only_bound_tenant(app_conn, admin_dsn, seeded):
    tenant_a, tenant_b = seeded
    before_a = await _admin_rows(admin_dsn, tenant_a)
    async with app_conn.transaction():
        await app_conn.execute(BIND, tenant_b)
        status = await app_conn.execute("UPDATE sites.sites SET name = 'x'")
    assert status == "UPDATE 2"
    assert await _admin_rows(admin_dsn, tenant_b) == {"B-1": "x", "SHARED": "x"}
    assert await _admin_rows(admin_dsn, tenant_a) == before_a
    assert set(before_a.values()) == {f"{tenant_a} A-1", f"{tenant_a} A-2", f"{tenant_a} SHARED"}


async def test_unfiltered_delete_touches_only_bound_tenant(app_conn, admin_dsn, seeded):
    tenant_a, tenant_b = seeded
    async with app_conn.transaction():
        await app_conn.execute(BIND, tenant_b)
        status = await app_conn.execute("DELETE FROM sites.sites")
    assert status == "DELETE 2"
    assert await _admin_rows(admin_dsn, tenant_b) == {}
    assert sorted(await _admin_rows(admin_dsn, tenant_a)) == ["A-1", "A-2", "SHARED"]


async def test_no_tenant_bound_sees_and_touches_nothing(app_conn, admin_dsn, seeded):
    tenant_a, tenant_b = seeded
    # A fresh session: the setting has never been defined, current_setting(..., true) is NULL.
    assert await app_conn.fetchval("SELECT current_setting('app.current_tenant_id', true)") is None
    async with app_conn.transaction():
        assert await app_conn.fetch("SELECT * FROM sites.sites") == []
        assert await app_conn.execute("UPDATE sites.sites SET name = 'x'") == "UPDATE 0"
        assert await app_conn.execute("DELETE FROM sites.sites") == "DELETE 0"
        assert await app_conn.fetch("SELECT * FROM sites.create_requests") == []
    assert sorted(await _admin_rows(admin_dsn, tenant_a)) == ["A-1", "A-2", "SHARED"]
    assert sorted(await _admin_rows(admin_dsn, tenant_b)) == ["B-1", "SHARED"]


async def test_empty_tenant_setting_sees_nothing(app_conn, seeded):
    async with app_conn.transaction():
        await app_conn.execute(BIND, "")
        assert await app_conn.fetch("SELECT * FROM sites.sites") == []


async def test_insert_into_other_tenant_is_refused(app_conn, admin_dsn, seeded):
    tenant_a, tenant_b = seeded
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with app_conn.transaction():
            await app_conn.execute(BIND, tenant_b)
            await app_conn.execute(
                "INSERT INTO sites.sites (tenant_id, site_id, name) VALUES ($1, 'SNEAK', 'sneaky')", tenant_a
            )
    assert "SNEAK" not in await _admin_rows(admin_dsn, tenant_a)
    # The same insert for the bound tenant is allowed (so the refusal above is the policy's doing).
    async with app_conn.transaction():
        await app_conn.execute(BIND, tenant_b)
        await app_conn.execute("INSERT INTO sites.sites (tenant_id, site_id, name) VALUES ($1, 'OWN', 'own')", tenant_b)
    assert (await _admin_rows(admin_dsn, tenant_b))["OWN"] == "own"


async def test_create_request_into_other_tenant_is_refused(app_conn, seeded):
    tenant_a, tenant_b = seeded
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with app_conn.transaction():
            await app_conn.execute(BIND, tenant_b)
            await app_conn.execute(
                "INSERT INTO sites.create_requests (tenant_id, request_id, request_hash, response) "
                "VALUES ($1, 'r1', 'h', '\\x00')",
                tenant_a,
            )


async def test_update_moving_row_to_other_tenant_is_refused(app_conn, admin_dsn, seeded):
    tenant_a, tenant_b = seeded
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with app_conn.transaction():
            await app_conn.execute(BIND, tenant_b)
            await app_conn.execute("UPDATE sites.sites SET tenant_id = $1 WHERE site_id = 'B-1'", tenant_a)
    assert sorted(await _admin_rows(admin_dsn, tenant_b)) == ["B-1", "SHARED"]
    assert sorted(await _admin_rows(admin_dsn, tenant_a)) == ["A-1", "A-2", "SHARED"]


async def test_tenant_setting_is_transaction_local(app_conn, seeded):
    tenant_a, tenant_b = seeded
    async with app_conn.transaction():
        await app_conn.execute(BIND, tenant_b)
        assert len(await app_conn.fetch("SELECT * FROM sites.sites")) == 2
    # After COMMIT the same connection carries no tenant: nothing is visible any more.
    assert await app_conn.fetchval("SELECT current_setting('app.current_tenant_id', true)") in (None, "")
    async with app_conn.transaction():
        assert await app_conn.fetch("SELECT * FROM sites.sites") == []
        assert await app_conn.execute("UPDATE sites.sites SET name = 'x'") == "UPDATE 0"
    assert await app_conn.fetch("SELECT * FROM sites.sites") == []

    # ROLLBACK clears it too.
    tx = app_conn.transaction()
    await tx.start()
    await app_conn.execute(BIND, tenant_a)
    assert len(await app_conn.fetch("SELECT * FROM sites.sites")) == 3
    await tx.rollback()
    assert await app_conn.fetch("SELECT * FROM sites.sites") == []


async def test_runtime_role_cannot_disable_rls(app_conn, seeded):
    """The runtime role is not the owner: it can neither turn RLS off nor opt out of it."""
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await app_conn.execute("ALTER TABLE sites.sites DISABLE ROW LEVEL SECURITY")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await app_conn.execute("ALTER TABLE sites.sites NO FORCE ROW LEVEL SECURITY")
    # row_security = off makes a query that RLS would filter fail instead of bypassing it.
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with app_conn.transaction():
            await app_conn.execute("SET LOCAL row_security = off")
            await app_conn.fetch("SELECT * FROM sites.sites")
    # Nor can it read the migration bookkeeping.
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await app_conn.fetch("SELECT * FROM platform_meta.schema_migrations")


# --- Catalog facts ---------------------------------------------------------------------


async def test_runtime_role_attributes(admin):
    role = await admin.fetchrow(
        "SELECT rolsuper, rolbypassrls, rolcanlogin, rolcreaterole, rolcreatedb "
        "FROM pg_roles WHERE rolname = 'sites_app'"
    )
    assert role is not None
    assert role["rolcanlogin"] is True
    assert role["rolsuper"] is False
    assert role["rolbypassrls"] is False
    assert role["rolcreaterole"] is False
    assert role["rolcreatedb"] is False
    # Not a member of any role that is superuser / BYPASSRLS / owns the schema.
    memberships = await admin.fetch(
        """SELECT r.rolname FROM pg_roles r
           WHERE pg_has_role('sites_app', r.oid, 'MEMBER') AND r.rolname <> 'sites_app'"""
    )
    assert [m["rolname"] for m in memberships] == []


async def test_runtime_role_owns_nothing_in_schema(admin):
    owned = await admin.fetch(
        """SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = 'sites' AND c.relowner = 'sites_app'::regrole"""
    )
    assert owned == []
    schema_owner = await admin.fetchval("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'sites'")
    assert schema_owner == "sites_owner"
    table_owners = await admin.fetch(
        """SELECT DISTINCT c.relowner::regrole::text AS owner FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'sites'"""
    )
    assert [r["owner"] for r in table_owners] == ["sites_owner"]


#: Every schema a service owns; each must hold to the same rules.
SERVICE_SCHEMAS = ["sites", "tenant", "audit"]
#: The registry's routing directory: a host belongs to one tenant platform-wide, so its key
#: is the host (a reference table under Citus). Its tenant_id index leads with tenant_id.
#: Likewise a single sign-on issuer belongs to one tenant platform-wide (tenant_sso's key is
#: its tenant_id; the issuer's uniqueness is the one global index).
GLOBAL_KEYS = {"tenant.host_routes_pkey", "tenant.tenant_sso_issuer_key"}


async def test_every_table_enables_and_forces_rls(admin):
    tables = await admin.fetch(
        """SELECT n.nspname || '.' || c.relname AS relname, c.relrowsecurity, c.relforcerowsecurity,
                  (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid) AS policies
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = ANY($1) AND c.relkind IN ('r', 'p', 'm', 'f', 'v')
           ORDER BY 1""",
        SERVICE_SCHEMAS,
    )
    names = {t["relname"] for t in tables}
    assert {"sites.create_requests", "sites.sites", "tenant.tenants", "tenant.tenant_settings"} <= names
    for t in tables:
        assert t["relrowsecurity"], t["relname"]
        assert t["relforcerowsecurity"], t["relname"]
        assert t["policies"] >= 1, t["relname"]


async def test_every_key_and_index_leads_with_tenant_id(admin):
    indexes = await admin.fetch(
        """SELECT i.indexrelid::regclass::text AS index, t.relname AS table, i.indisprimary,
                  a.attname AS first_column
           FROM pg_index i
           JOIN pg_class t ON t.oid = i.indrelid
           JOIN pg_namespace n ON n.oid = t.relnamespace
           LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
           WHERE n.nspname = ANY($1)
           ORDER BY 1""",
        SERVICE_SCHEMAS,
    )
    assert {"sites", "create_requests", "tenants", "tenant_settings"} <= {
        r["table"] for r in indexes if r["indisprimary"]
    }
    assert "sites.sites_by_region" in {r["index"] for r in indexes}
    for r in indexes:
        if r["index"] in GLOBAL_KEYS:
            continue
        # first_column is None for an expression index: that would fail too.
        assert r["first_column"] == "tenant_id", dict(r)


# --- The data layer refuses to run without a tenant ------------------------------------


async def test_database_transaction_refuses_without_tenant(sites_runtime_dsn, seeded):
    tenant_a, _ = seeded
    db = await Database.connect(sites_runtime_dsn, min_size=1, max_size=1)
    try:
        assert context.current() is None
        with pytest.raises(NoTenantError):
            async with db.transaction():
                raise AssertionError("must not get a connection without a tenant")
        # A public call's context (no tenant) is refused the same way.
        with context.bind(RequestContext(request_id=uuid.uuid4().hex, method="/test/Public")):
            with pytest.raises(NoTenantError):
                async with db.transaction(readonly=True):
                    raise AssertionError("must not get a connection without a tenant")
        # The refusals leaked no connection (max_size=1), and a bound call works.
        with context.bind(RequestContext(request_id=uuid.uuid4().hex, method="/test/Bound", tenant_id=tenant_a)):
            async with db.transaction(readonly=True) as conn:
                seen = await conn.fetch("SELECT DISTINCT tenant_id FROM sites.sites")
        assert [r["tenant_id"] for r in seen] == [tenant_a]
    finally:
        await db.close()


def _call_of(tenant_id: str) -> RequestContext:
    return RequestContext(request_id=uuid.uuid4().hex, method="/test/Bound", tenant_id=tenant_id)


async def test_database_transaction_begins_and_binds_the_tenant_in_one_round_trip(sites_runtime_dsn, seeded):
    """BEGIN and the binding go as one simple query, the release sends nothing; it binds, for its transaction only."""
    tenant_a, tenant_b = seeded
    db = await Database.connect(sites_runtime_dsn, min_size=1, max_size=1)
    sent: list[str] = []
    try:
        with context.bind(_call_of(tenant_a)):
            async with db.transaction(readonly=True) as conn:
                conn.add_query_logger(lambda query: sent.append(query.query))
                first_pid = await conn.fetchval("SELECT pg_backend_pid()")
        assert sent == ["SELECT pg_backend_pid()", "COMMIT"]  # and nothing more at the release: no reset
        sent.clear()
        with context.bind(_call_of(tenant_b)):
            async with db.transaction() as conn:
                seen = await conn.fetch("SELECT tenant_id, site_id FROM sites.sites")
                assert await conn.fetchval("SELECT pg_backend_pid()") == first_pid  # the same connection again
        assert sent == [
            f"BEGIN; SELECT set_config('app.current_tenant_id', '{tenant_b}', true)",
            "SELECT tenant_id, site_id FROM sites.sites",
            "SELECT pg_backend_pid()",
            "COMMIT",
        ]
        assert sorted((r["tenant_id"], r["site_id"]) for r in seen) == [(tenant_b, "B-1"), (tenant_b, "SHARED")]
        # Transaction-local: the same connection, in the next transaction, carries no tenant.
        async with db.platform_read("test: the binding is gone") as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") == first_pid
            assert await conn.fetchval("SELECT current_setting('app.current_tenant_id', true)") in (None, "")
            assert await conn.fetch("SELECT * FROM sites.sites") == []
    finally:
        await db.close()


async def test_the_quoted_tenant_literal_reads_back_as_written_whatever_the_string_settings(app_conn):
    """The binding is sent as a literal, not a parameter: quote_literal must give back exactly the value."""
    hostile = ["ta_1", "o'k", "a\\b", "\\'); SELECT set_config('app.platform_read', 'on', true); --", "''", "é€"]
    for conforming in ("on", "off"):
        await app_conn.execute(f"SET standard_conforming_strings = {conforming}")
        for value in hostile:
            assert await app_conn.fetchval(f"SELECT {quote_literal(value)}::text") == value, (conforming, value)
    with pytest.raises(ValueError, match="NUL"):
        quote_literal("a\x00b")


async def _wait_for_query(admin: asyncpg.Connection[Any], pid: int, query: str) -> None:
    for _ in range(200):  # up to 10 s
        if await admin.fetchval("SELECT query FROM pg_stat_activity WHERE pid = $1 AND state = 'active'", pid) == query:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"backend {pid} never ran {query!r}")


async def test_a_transaction_ended_by_an_error_a_cancellation_or_a_lost_connection_leaves_none_open(
    sites_runtime_dsn, admin, seeded
):
    """Ours, not asyncpg's, the transaction still ends on every path: no connection goes back to the pool in it."""
    tenant_a, _ = seeded
    name = f"rls-end-{uuid.uuid4().hex[:8]}"
    db = await Database.connect(sites_runtime_dsn, min_size=1, max_size=1, application_name=name)

    async def sessions() -> list[str]:
        rows = await admin.fetch("SELECT state FROM pg_stat_activity WHERE application_name = $1", name)
        return [r["state"] for r in rows]

    try:
        with context.bind(_call_of(tenant_a)):
            # An error in the block: rolled back, and the same connection comes back outside any transaction.
            with pytest.raises(RuntimeError, match="the call failed"):
                async with db.transaction() as conn:
                    pid = await conn.fetchval("SELECT pg_backend_pid()")
                    await conn.execute("UPDATE sites.sites SET name = 'rolled back' WHERE site_id = 'A-1'")
                    raise RuntimeError("the call failed")
            assert await sessions() == ["idle"]
            async with db.transaction(readonly=True) as conn:
                assert await conn.fetchval("SELECT pg_backend_pid()") == pid
                assert await conn.fetchval("SELECT name FROM sites.sites WHERE site_id = 'A-1'") == f"{tenant_a} A-1"

            # Cancelled mid-statement (a client's deadline): the statement is cancelled and the transaction ends.
            async def slow() -> None:
                async with db.transaction() as conn:
                    await conn.execute("UPDATE sites.sites SET name = 'cancelled' WHERE site_id = 'A-1'")
                    await conn.execute("SELECT pg_sleep(30)")

            task = asyncio.create_task(slow())
            await _wait_for_query(admin, pid, "SELECT pg_sleep(30)")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            async with db.transaction(readonly=True) as conn:
                assert await conn.fetchval("SELECT name FROM sites.sites WHERE site_id = 'A-1'") == f"{tenant_a} A-1"
                pid = await conn.fetchval("SELECT pg_backend_pid()")
            assert await sessions() == ["idle"]

            # The connection lost mid-statement: the call fails as unreachable, the pool opens a new one.
            async def cut() -> None:
                await _wait_for_query(admin, pid, "SELECT pg_sleep(20)")
                await admin.execute("SELECT pg_terminate_backend($1)", pid)

            with pytest.raises(UNREACHABLE):
                async with db.transaction() as conn:
                    await asyncio.gather(conn.execute("SELECT pg_sleep(20)"), cut())
            async with db.transaction(readonly=True) as conn:
                assert await conn.fetchval("SELECT pg_backend_pid()") != pid
                assert len(await conn.fetch("SELECT * FROM sites.sites")) == 3
            assert await sessions() == ["idle"]
    finally:
        await db.close()
