"""The doors across tenants (``context.DOORS``): each lets through whom its row says and reaches what it says.

The first tests read the code, not a server: each door is used only by the modules its
row names, is defined where the row says, and every test a row names exists, so the
table cannot drift from the code; and no module but the database layer sets what
row-level security reads, which would be a door of its own. The others open each door against the real database
as the services' runtime roles and look at which tenants' rows it shows and accepts.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from deploy.local.stack import Stack
from services.runtime import context
from services.runtime.context import DOORS, Caller, PlatformScopeError, RequestContext
from services.runtime.db import Database
from services.runtime.migrations import SHARED, load

REPO = Path(__file__).resolve().parents[1]
#: The code the doors' rows are about: everything that runs, none of the tests.
CODE = ("services", "deploy", "gateway")


def _caller(tenant_id: str, role: str = "admin", *, service: bool = False) -> Caller:
    return Caller(
        subject=f"test-{role}@{tenant_id}", tenant_id=tenant_id, role=role, permissions=frozenset(), token="",
        service=service,
    )  # fmt: skip


def _call(tenant_id: str | None, caller: Caller | None) -> RequestContext:
    return RequestContext(request_id=uuid.uuid4().hex, method="/test/Doors", caller=caller, tenant_id=tenant_id)


PLATFORM_ADMIN = _caller(context.PLATFORM_TENANT, context.PLATFORM_ADMIN_ROLE)
SERVICE = _caller(context.PLATFORM_TENANT, "service", service=True)


# --- The table against the code --------------------------------------------------------


def _code_files() -> Iterator[Path]:
    for top in CODE:
        yield from sorted((REPO / top).rglob("*.py"))


def _doors_used(tree: ast.AST) -> set[str]:
    """The doors a module uses: ``context.<door>`` or a door imported from the context module,
    and the ``Database`` methods by name (names no other object has)."""
    functions = {name for name, door in DOORS.items() if "." not in door.defined_in.split("::")[1]}
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in DOORS:
            from_context = isinstance(node.value, ast.Name) and node.value.id == "context"
            if node.attr not in functions or from_context:
                used.add(node.attr)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] == "context":
            used.update(alias.name for alias in node.names if alias.name in functions)
    return used


def _defined(tree: ast.AST) -> set[str]:
    """``name`` and ``Class.name`` for every function and method the module defines."""
    found: set[str] = set()
    for node in getattr(tree, "body", []):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found.add(node.name)
        elif isinstance(node, ast.ClassDef):
            methods = [item for item in node.body if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)]
            found.update(f"{node.name}.{method.name}" for method in methods)
    return found


def _door_users() -> dict[str, set[str]]:
    """{door: modules that use it}, read from the code (a door's defining module excluded)."""
    users: dict[str, set[str]] = {name: set() for name in DOORS}
    for path in _code_files():
        module = path.relative_to(REPO).as_posix()
        used = _doors_used(ast.parse(path.read_text(), filename=module))
        for name, door in DOORS.items():
            if name in used and module != door.defined_in.split("::")[0]:
                users[name].add(module)
    return users


def test_each_door_is_used_only_by_the_modules_its_row_names() -> None:
    found = _door_users()
    for name, door in DOORS.items():
        unlisted = found[name] - door.users
        assert not unlisted, f"{name} is used by {sorted(unlisted)}, which context.DOORS does not allow"
        stale = door.users - found[name]
        assert not stale, f"context.DOORS allows {name} to {sorted(stale)}, which no longer use it: drop them"


def test_each_door_is_defined_where_its_row_says() -> None:
    for name, door in DOORS.items():
        module, qualified = door.defined_in.split("::")
        assert qualified.rsplit(".", 1)[-1] == name, door.defined_in
        assert qualified in _defined(ast.parse((REPO / module).read_text())), f"{door.defined_in} does not exist"


def test_each_door_names_tests_that_exist() -> None:
    for name, door in DOORS.items():
        assert door.proven_by, f"{name}: no test proves it"
        for test in door.proven_by:
            file, function = test.split("::")
            path = REPO / file
            assert path.is_file(), f"{name}: {file} does not exist"
            assert function in _defined(ast.parse(path.read_text())), f"{name}: {test} does not exist"


def _strings(tree: ast.AST) -> Iterator[str]:
    """The module's string constants, its docstrings left out."""
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, documented) and node.body and isinstance(node.body[0], ast.Expr)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.value


def test_only_the_database_layer_sets_what_row_level_security_reads() -> None:
    # set_config('app.current_tenant_id' | 'app.platform_read' | 'app.audit_relay', ...) anywhere
    # else would be a door the table does not list.
    setters = {
        path.relative_to(REPO).as_posix()
        for path in _code_files()
        if any("set_config(" in text for text in _strings(ast.parse(path.read_text())))
    }
    assert setters == {"services/runtime/db.py"}


# --- What each door checks, without a server -------------------------------------------


def test_bind_restores_the_previous_context_when_the_block_ends() -> None:
    outer, inner = _call("tenant_a", None), _call("tenant_b", None)
    with context.bind(outer):
        with context.bind(inner):
            assert context.current_tenant() == "tenant_b"
        assert context.current() is outer
        with pytest.raises(LookupError), context.bind(inner):
            raise LookupError("a failing block")
        assert context.current() is outer
    assert context.current() is None


@pytest.mark.parametrize(
    "call",
    [None, _call(None, None), _call("tenant_a", None), _call("tenant_a", _caller("tenant_a"))],
    ids=["no call", "public call", "no caller", "tenant admin"],
)
def test_platform_scope_refuses_a_caller_that_is_not_the_platform(call: RequestContext | None) -> None:
    with context.bind(call) if call is not None else contextlib.nullcontext():
        with (
            pytest.raises(PlatformScopeError, match="needs a platform caller"),
            context.platform_scope("tenant_b", "test"),
        ):
            raise AssertionError("a tenant's user must not act on another tenant")
        assert context.current() is call


@pytest.mark.parametrize("tenant_id", ["", "Tenant_B", "x", "tenant b", "tenant_b'--"])
def test_platform_scope_refuses_what_is_not_a_tenant_id(tenant_id: str) -> None:
    with context.bind(_call(context.PLATFORM_TENANT, PLATFORM_ADMIN)):
        with pytest.raises(PlatformScopeError, match="not a tenant id"), context.platform_scope(tenant_id, "test"):
            raise AssertionError("bound a malformed tenant id")


@pytest.mark.parametrize("tenant_id", ["", "Tenant_B", "x", "tenant b", "tenant_b'--"])
def test_system_scope_refuses_what_is_not_a_tenant_id(tenant_id: str) -> None:
    with pytest.raises(PlatformScopeError, match="not a tenant id"), context.system_scope(tenant_id, "test"):
        raise AssertionError("bound a malformed tenant id")


def test_background_context_is_the_service_bound_to_the_platform_tenant() -> None:
    ctx = context.background_context("sites", "test.purpose", "req-1")
    assert ctx.tenant_id == context.PLATFORM_TENANT
    assert ctx.caller is not None and ctx.caller.service and ctx.caller.is_platform
    assert not ctx.caller.is_platform_admin  # a service, never taken for a person
    assert (ctx.caller.subject, ctx.method, ctx.request_id) == ("service:sites", "test.purpose", "req-1")


# --- What each door reaches, against the real database ---------------------------------


@pytest.fixture
async def sites_of(admin: asyncpg.Connection[Any], tenant_pair: tuple[str, str]) -> AsyncIterator[tuple[str, str]]:
    """Two tenants with two sites each in ``sites.sites``, written as the superuser."""
    for tenant_id in tenant_pair:
        for site_id in ("S-1", "S-2"):
            await admin.execute(
                "INSERT INTO sites.sites (tenant_id, site_id, name) VALUES ($1, $2, $3)", tenant_id, site_id, site_id
            )
    yield tenant_pair
    await admin.execute("DELETE FROM sites.sites WHERE tenant_id = ANY($1::text[])", list(tenant_pair))


@pytest.fixture
async def sites_db(sites_runtime_dsn: str) -> AsyncIterator[Database]:
    db = await Database.connect(sites_runtime_dsn, min_size=1, max_size=2)
    yield db
    await db.close()


@pytest.fixture
async def registry_db(stack: Stack) -> AsyncIterator[Database]:
    dsn = stack.runtime_dsn("tenant")
    db = await Database.connect(dsn, min_size=1, max_size=1)
    yield db
    await db.close()


async def _tenants_seen(conn: asyncpg.Connection[Any], table: str, among: tuple[str, ...]) -> set[str]:
    rows = await conn.fetch(f"SELECT DISTINCT tenant_id FROM {table} WHERE tenant_id = ANY($1::text[])", list(among))
    return {r["tenant_id"] for r in rows}


async def _insert_site(conn: asyncpg.Connection[Any], tenant_id: str) -> None:
    await conn.execute("INSERT INTO sites.sites (tenant_id, site_id, name) VALUES ($1, 'NEW', 'new')", tenant_id)


@pytest.mark.stack
async def test_platform_scope_binds_only_the_named_tenant(sites_db: Database, sites_of: tuple[str, str]) -> None:
    tenant_a, tenant_b = sites_of
    with context.bind(_call(context.PLATFORM_TENANT, PLATFORM_ADMIN)), context.platform_scope(tenant_b, "test"):
        async with sites_db.transaction() as conn:
            assert await _tenants_seen(conn, "sites.sites", sites_of) == {tenant_b}
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
                await _insert_site(conn, tenant_a)


@pytest.mark.stack
async def test_system_scope_binds_only_the_named_tenant_without_any_caller(
    sites_db: Database, sites_of: tuple[str, str]
) -> None:
    tenant_a, tenant_b = sites_of
    assert context.current() is None
    with context.system_scope(tenant_a, "test") as bound:
        assert bound.caller is None
        async with sites_db.transaction() as conn:
            assert await _tenants_seen(conn, "sites.sites", sites_of) == {tenant_a}
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
                await _insert_site(conn, tenant_b)


@pytest.mark.stack
async def test_background_context_without_a_tenant_reaches_no_tenant_rows(
    sites_db: Database, sites_of: tuple[str, str]
) -> None:
    with context.bind(context.background_context("sites", "test", uuid.uuid4().hex)):
        async with sites_db.transaction() as conn:
            assert await _tenants_seen(conn, "sites.sites", sites_of) == set()
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
                await _insert_site(conn, sites_of[0])


@pytest.mark.stack
async def test_background_context_reaches_a_tenant_only_through_platform_scope(
    sites_db: Database, sites_of: tuple[str, str]
) -> None:
    tenant_a, _ = sites_of
    with context.bind(context.background_context("sites", "test", uuid.uuid4().hex)):
        with context.platform_scope(tenant_a, "test"):
            async with sites_db.transaction(readonly=True) as conn:
                assert await _tenants_seen(conn, "sites.sites", sites_of) == {tenant_a}
        async with sites_db.transaction(readonly=True) as conn:
            assert await _tenants_seen(conn, "sites.sites", sites_of) == set()


@pytest.mark.stack
@pytest.mark.parametrize(
    "caller", [None, _caller("tenant_a"), PLATFORM_ADMIN], ids=["no caller", "tenant admin", "platform admin"]
)
async def test_rebind_tenant_refuses_a_caller_that_is_not_a_platform_service(
    sites_db: Database, sites_of: tuple[str, str], caller: Caller | None
) -> None:
    tenant_a, tenant_b = sites_of
    with context.bind(_call(tenant_a, caller)):
        async with sites_db.transaction(readonly=True) as conn:
            with pytest.raises(PlatformScopeError, match="needs a platform service"):
                await sites_db.rebind_tenant(conn, tenant_b, "test")
            assert await _tenants_seen(conn, "sites.sites", sites_of) == {tenant_a}


@pytest.mark.stack
async def test_rebind_tenant_refuses_a_connection_outside_a_transaction(
    sites_db: Database, sites_runtime_dsn: str, sites_of: tuple[str, str]
) -> None:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(sites_runtime_dsn)
    try:
        with context.bind(_call(context.PLATFORM_TENANT, SERVICE)):
            with pytest.raises(RuntimeError, match="needs an open transaction"):
                await sites_db.rebind_tenant(conn, sites_of[1], "test")
        assert await conn.fetchval("SELECT current_setting('app.current_tenant_id', true)") in (None, "")
        assert await _tenants_seen(conn, "sites.sites", sites_of) == set()
    finally:
        await conn.close()


@pytest.mark.stack
async def test_rebind_tenant_moves_the_transaction_to_the_named_tenant_only(
    sites_db: Database, sites_of: tuple[str, str]
) -> None:
    tenant_a, tenant_b = sites_of
    with context.bind(_call(tenant_a, SERVICE)):
        async with sites_db.transaction() as conn:
            assert await _tenants_seen(conn, "sites.sites", sites_of) == {tenant_a}
            await sites_db.rebind_tenant(conn, tenant_b, "test")
            assert await _tenants_seen(conn, "sites.sites", sites_of) == {tenant_b}
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
                await _insert_site(conn, tenant_a)


@pytest.mark.stack
async def test_rebind_tenant_is_logged_with_its_purpose(
    sites_db: Database, sites_of: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="towerco.platform")
    tenant_a, tenant_b = sites_of
    call = _call(tenant_a, SERVICE)
    with context.bind(call):
        async with sites_db.transaction(readonly=True) as conn:
            await sites_db.rebind_tenant(conn, tenant_b, "test.rebind")
    lines = [r.getMessage() for r in caplog.records if r.name == "towerco.platform"]
    expected = f"platform path test.rebind: {SERVICE.subject} binds tenant {tenant_b} (request {call.request_id})"
    assert lines == [expected]


@pytest.mark.stack
async def test_platform_read_cannot_write(registry_db: Database, tenant_pair: tuple[str, str]) -> None:
    async with registry_db.platform_read("test") as conn:
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await conn.execute("UPDATE tenant.tenants SET display_name = 'seized' WHERE tenant_id = $1", tenant_pair[0])


@pytest.mark.stack
async def test_platform_read_shows_every_tenant_only_in_the_directory_tables(
    registry_db: Database, admin: asyncpg.Connection[Any], tenant_pair: tuple[str, str]
) -> None:
    # Both tenants have settings (written when they were provisioned): the superuser sees them.
    assert await _tenants_seen(admin, "tenant.tenant_settings", tenant_pair) == set(tenant_pair)
    async with registry_db.platform_read("test") as conn:
        assert await _tenants_seen(conn, "tenant.tenants", tenant_pair) == set(tenant_pair)
        assert await _tenants_seen(conn, "tenant.tenant_settings", tenant_pair) == set()


@pytest.fixture
async def usage_of(admin: asyncpg.Connection[Any], tenant_pair: tuple[str, str]) -> AsyncIterator[tuple[str, str]]:
    """Two tenants, each with an hour of usage and a limit override in the feature gate, written as the superuser."""
    for tenant_id in tenant_pair:
        await admin.execute(
            "INSERT INTO features.usage_hourly (tenant_id, hour, counter, value) "
            "VALUES ($1, '2026-01-01T00:00:00Z', 'read_calls', 1)",
            tenant_id,
        )
        await admin.execute(
            "INSERT INTO features.limit_overrides (tenant_id, resource, limit_value) VALUES ($1, 'max_sites', 7) "
            "ON CONFLICT DO NOTHING",
            tenant_id,
        )
    yield tenant_pair
    await admin.execute("DELETE FROM features.usage_hourly WHERE tenant_id = ANY($1::text[])", list(tenant_pair))
    await admin.execute("DELETE FROM features.limit_overrides WHERE tenant_id = ANY($1::text[])", list(tenant_pair))


@pytest.fixture
async def features_db(stack: Stack) -> AsyncIterator[Database]:
    dsn = stack.runtime_dsn("features")
    db = await Database.connect(dsn, min_size=1, max_size=1)
    yield db
    await db.close()


@pytest.mark.stack
async def test_platform_read_shows_every_tenants_usage_and_no_other_feature_gate_rows(
    features_db: Database, usage_of: tuple[str, str]
) -> None:
    async with features_db.platform_read("test") as conn:
        assert await _tenants_seen(conn, "features.usage_hourly", usage_of) == set(usage_of)
        assert await _tenants_seen(conn, "features.limit_overrides", usage_of) == set()
        assert await _tenants_seen(conn, "features.usage_flushes", usage_of) == set()
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await conn.execute("DELETE FROM features.usage_hourly WHERE tenant_id = $1", usage_of[0])


@pytest.fixture
async def outbox(admin: asyncpg.Connection[Any], tenant_pair: tuple[str, str]) -> AsyncIterator[str]:
    """A scratch schema made by the services' own audit outbox migration, with an event of each tenant.

    Not a service's outbox: its relay would take the events away while the test looks.
    """
    schema = f"doors_{uuid.uuid4().hex[:10]}"
    await admin.execute(f"CREATE SCHEMA {schema}")
    await admin.execute(f"GRANT USAGE ON SCHEMA {schema} TO sites_app")
    async with admin.transaction():
        await admin.execute(f"SET LOCAL search_path = {schema}")
        for migration in load(SHARED / "audit_outbox"):
            await admin.execute(migration.sql.replace("{{app_role}}", "sites_app"))
    for tenant_id in tenant_pair:
        await admin.execute(
            f"INSERT INTO {schema}.audit_outbox (tenant_id, event_id, event) VALUES ($1, $2, '')",
            tenant_id,
            uuid.uuid4(),
        )
    yield schema
    await admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.mark.stack
async def test_outbox_transaction_reads_every_tenants_events(
    sites_db: Database, outbox: str, tenant_pair: tuple[str, str]
) -> None:
    with context.bind(context.background_context("sites", "test", uuid.uuid4().hex)):
        async with sites_db.outbox_transaction("test") as conn:
            rows = await conn.fetch(f"SELECT tenant_id FROM {outbox}.audit_outbox FOR UPDATE SKIP LOCKED")
            assert sorted(r["tenant_id"] for r in rows) == sorted(tenant_pair)
        # The same events through the call's door: its own tenant's only.
        with context.bind(_call(tenant_pair[0], None)):
            async with sites_db.transaction(readonly=True) as conn:
                assert await _tenants_seen(conn, f"{outbox}.audit_outbox", tenant_pair) == {tenant_pair[0]}


@pytest.mark.stack
async def test_outbox_transaction_shows_no_tenant_rows_elsewhere(sites_db: Database, sites_of: tuple[str, str]) -> None:
    with context.bind(context.background_context("sites", "test", uuid.uuid4().hex)):
        async with sites_db.outbox_transaction("test") as conn:
            assert await _tenants_seen(conn, "sites.sites", sites_of) == set()
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
                await _insert_site(conn, sites_of[0])


@pytest.mark.stack
async def test_outbox_transaction_cannot_add_or_change_events(
    sites_db: Database, outbox: str, tenant_pair: tuple[str, str]
) -> None:
    tenant_a, _ = tenant_pair
    with context.bind(context.background_context("sites", "test", uuid.uuid4().hex)):
        async with sites_db.outbox_transaction("test") as conn:
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
                await conn.execute(
                    f"INSERT INTO {outbox}.audit_outbox (tenant_id, event_id, event) VALUES ($1, $2, '')",
                    tenant_a,
                    uuid.uuid4(),
                )
        async with sites_db.outbox_transaction("test") as conn:
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
                await conn.execute(f"UPDATE {outbox}.audit_outbox SET create_time = now()")
