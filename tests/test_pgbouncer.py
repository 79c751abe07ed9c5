"""The services behind pgbouncer in transaction mode: no tenant's binding ever reaches another.

A real pgbouncer (Debian's) in front of the session's PostgreSQL, ``pool_mode =
transaction`` with two server connections for the sites runtime role, and a sites process
of the module's own reaching the database only through it (``DB_POOL_MODE=transaction``).
Transaction pooling hands one server session to whichever client's transaction comes
next, so anything a transaction leaves on the session reaches the next client: the
tenant binding is ``set_config(..., true)``, transaction-local, which is what makes this
safe. The last test shows it at the SQL level next to the unsafe session-level binding.
"""

from __future__ import annotations

import asyncio
import collections
import random
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import asyncpg
import grpc
import pytest
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as pb_grpc

from deploy.local.postgres import SERVER_USER, postgres_bin_dir
from deploy.local.procs import ensure_system_user, ensure_traversable, run_command, wait_until
from deploy.local.stack import Stack
from services.runtime import context
from services.runtime.context import RequestContext
from services.runtime.db import TRANSACTION_POOLING, Database

from .conftest import OUTPUT
from .support import bearer, free_port
from .support.processes import ExtraService, ExtraServices

PGBOUNCER = "/usr/sbin/pgbouncer"
#: Server connections pgbouncer may open for the sites role: far fewer than the clients.
SERVER_POOL = 2


@dataclass
class PgBouncer:
    """A pgbouncer of this module's own, in transaction mode, in front of one PostgreSQL database."""

    folder: Path
    port: int
    user: str
    password: str
    process: subprocess.Popen[bytes] | None = None

    def dsn(self, database: str) -> str:
        return f"postgresql://{quote(self.user)}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/{database}"

    def show(self, what: str) -> list[dict[str, str]]:
        """``SHOW <what>`` on pgbouncer's console (simple queries only, hence psql)."""
        result = run_command(
            [
                str(postgres_bin_dir() / "psql"),
                self.dsn("pgbouncer") + "?connect_timeout=5",
                "--no-align",
                "--field-separator=|",
                "-c",
                f"SHOW {what}",
            ],
            timeout=15,
        )
        assert result.returncode == 0, result.output
        header, *rows = [line for line in result.output.splitlines() if "|" in line]
        names = header.split("|")
        return [dict(zip(names, row.split("|"), strict=True)) for row in rows]


def _start_pgbouncer(folder: Path, admin_dsn: str, runtime_dsn: str) -> PgBouncer:
    server = urlsplit(admin_dsn)
    database = server.path.lstrip("/")
    runtime = urlsplit(runtime_dsn)
    bouncer = PgBouncer(folder, free_port(), unquote(runtime.username or ""), unquote(runtime.password or ""))
    upstream = f"host=127.0.0.1 port={server.port} dbname={database}"
    folder.mkdir(parents=True)
    (folder / "userlist.txt").write_text(f'"{bouncer.user}" "{bouncer.password}"\n')
    (folder / "pgbouncer.ini").write_text(
        "\n".join(
            [
                "[databases]",
                f"towerco = {upstream} pool_size={SERVER_POOL}",
                f"solo = {upstream} pool_size=1",  # for the SQL-level proof: one server session
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {bouncer.port}",
                "unix_socket_dir =",
                "pool_mode = transaction",
                "auth_type = scram-sha-256",
                f"auth_file = {folder / 'userlist.txt'}",
                f"stats_users = {bouncer.user}",
                "max_client_conn = 200",
                "server_reset_query =",
                "",
            ]
        )
    )
    for path in (folder, folder / "userlist.txt", folder / "pgbouncer.ini"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    ensure_traversable(folder)
    user = ensure_system_user(SERVER_USER)  # pgbouncer refuses to run as root
    log = (folder / "pgbouncer.log").open("ab")
    process = subprocess.Popen(
        [PGBOUNCER, str(folder / "pgbouncer.ini")],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        user=user.uid,
        group=user.gid,
        cwd="/",
    )
    log.close()
    bouncer.process = process

    def accepts() -> bool:
        return (
            run_command(
                [str(postgres_bin_dir() / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(bouncer.port)], timeout=5
            ).returncode
            == 0
        )

    if not wait_until(lambda: process.poll() is not None or accepts(), 15, interval=0.1) or process.poll() is not None:
        raise RuntimeError(f"pgbouncer did not start:\n{(folder / 'pgbouncer.log').read_text()}")
    return bouncer


@pytest.fixture(scope="module")
def pgbouncer(stack: Stack, sites_runtime_dsn: str) -> Iterator[PgBouncer]:
    folder = OUTPUT / f".pgbouncer-{uuid.uuid4().hex[:8]}"
    bouncer = _start_pgbouncer(folder, stack.database_url, sites_runtime_dsn)
    try:
        yield bouncer
    finally:
        assert bouncer.process is not None
        bouncer.process.terminate()
        try:
            bouncer.process.wait(10)
        except subprocess.TimeoutExpired:
            bouncer.process.kill()
            bouncer.process.wait()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def sites_behind_pgbouncer(stack: Stack, pgbouncer: PgBouncer) -> Iterator[ExtraService]:
    """A sites process whose only database connections go through pgbouncer."""
    services = ExtraServices(stack, OUTPUT / "logs")
    try:
        yield services.start(
            "sites",
            {
                "SITES_DATABASE_URL": pgbouncer.dsn("towerco"),
                "DB_POOL_MODE": "transaction",
                "DB_POOL_MIN_SIZE": "2",
                "DB_POOL_MAX_SIZE": "10",  # ten clients of pgbouncer sharing its two server sessions
                "DB_ACQUIRE_TIMEOUT_SECONDS": "10",
                "TENANT_CONCURRENCY_WAIT_SECONDS": "10",  # queueing, not the bulkhead, is not what is tested
            },
        )
    finally:
        services.stop()


async def test_tenants_calls_interleaved_through_a_tiny_server_pool_each_see_only_their_own_sites(
    sites_behind_pgbouncer: ExtraService,
    pgbouncer: PgBouncer,
    new_tenant: Callable[..., str],
    token: Callable[..., str],
) -> None:
    tenants = [new_tenant("pgb") for _ in range(4)]
    metadata = {tenant: bearer(token(tenant)) for tenant in tenants}
    async with grpc.aio.insecure_channel(sites_behind_pgbouncer.target) as channel:
        stub = pb_grpc.SiteServiceStub(channel)
        owned = collections.defaultdict(set)
        for n, tenant in enumerate(tenants):
            for i in range(n + 1):  # 1..4 sites: a count that also tells the tenants apart
                site_id = f"PGB-{i}"
                await stub.CreateSite(
                    pb.CreateSiteRequest(site_id=site_id, site=pb.Site(name=f"{tenant} {i}")),
                    metadata=metadata[tenant],
                    timeout=20,
                )
                owned[tenant].add((site_id, f"{tenant} {i}"))

        calls = [tenants[i % len(tenants)] for i in range(200)]
        random.Random(17).shuffle(calls)
        limit = asyncio.Semaphore(20)

        async def call(n: int, tenant: str) -> tuple[str, set[tuple[str, str]]]:
            async with limit:
                if n % 2:
                    reply = await stub.ListSites(pb.ListSitesRequest(), metadata=metadata[tenant], timeout=30)
                    return tenant, {(s.site_id, s.name) for s in reply.sites}
                site = await stub.GetSite(pb.GetSiteRequest(site_id="PGB-0"), metadata=metadata[tenant], timeout=30)
                return tenant, {(site.site_id, site.name)}

        answers = await asyncio.gather(*(call(n, tenant) for n, tenant in enumerate(calls)), return_exceptions=True)

    failures = [answer for answer in answers if isinstance(answer, BaseException)]
    assert not failures, f"{len(failures)} of 200 calls failed, e.g. {failures[0]!r}"
    for n, answer in enumerate(answers):
        assert not isinstance(answer, BaseException)
        tenant, seen = answer
        expected = owned[tenant] if n % 2 else {(s, name) for s, name in owned[tenant] if s == "PGB-0"}
        assert seen == expected, f"call {n} by {tenant} saw {seen - expected} besides its own"

    pool = next(p for p in pgbouncer.show("POOLS") if p["database"] == "towerco" and p["user"] == pgbouncer.user)
    servers = (
        int(pool["sv_active"])
        + int(pool["sv_idle"])
        + int(pool["sv_used"])
        + int(pool["sv_tested"])
        + int(pool["sv_login"])
    )
    clients = [c for c in pgbouncer.show("CLIENTS") if c["database"] == "towerco"]
    assert 1 <= servers <= SERVER_POOL, pool
    assert len(clients) > SERVER_POOL, f"the process's {len(clients)} connections did not outnumber the server sessions"


async def _row(conn: asyncpg.Connection[Any], query: str, *args: object) -> asyncpg.Record:
    row: asyncpg.Record | None = await conn.fetchrow(query, *args)
    assert row is not None
    return row


async def _connect(pgbouncer: PgBouncer) -> asyncpg.Connection[Any]:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(pgbouncer.dsn("solo"), statement_cache_size=0)
    return conn


async def test_a_transaction_local_binding_never_reaches_the_next_client_where_a_session_set_does(
    pgbouncer: PgBouncer,
    sites: pb_grpc.SiteServiceStub,
    new_tenant: Callable[..., str],
    token: Callable[..., str],
) -> None:
    tenant = new_tenant("pgbsql")
    sites.CreateSite(
        pb.CreateSiteRequest(site_id="LEAK-1", site=pb.Site(name="only mine")),
        metadata=bearer(token(tenant)),
        timeout=10,
    )
    first, second = await _connect(pgbouncer), await _connect(pgbouncer)  # two clients, one server session
    try:
        # Ours: the binding is transaction-local, so it ends with the transaction.
        async with first.transaction():
            bound = await _row(
                first, "SELECT set_config('app.current_tenant_id', $1, true) AS tenant, pg_backend_pid() AS pid", tenant
            )
            assert await first.fetchval("SELECT count(*) FROM sites.sites") == 1
        async with second.transaction():
            after = await _row(
                second,
                "SELECT current_setting('app.current_tenant_id', true) AS tenant, pg_backend_pid() AS pid, "
                "(SELECT count(*) FROM sites.sites) AS visible",
            )
        assert after["pid"] == bound["pid"], "the two clients did not share the server session: nothing proven"
        assert after["tenant"] in ("", None), f"the binding leaked to the next client: {after['tenant']!r}"
        assert after["visible"] == 0

        # The unsafe pattern: a session-level binding stays on the server session for whoever comes next.
        async with first.transaction():
            leaked_pid = await first.fetchval(
                "SELECT pg_backend_pid() FROM (SELECT set_config('app.current_tenant_id', $1, false)) AS s", tenant
            )
        try:
            async with second.transaction():
                leak = await _row(
                    second,
                    "SELECT current_setting('app.current_tenant_id', true) AS tenant, pg_backend_pid() AS pid, "
                    "(SELECT count(*) FROM sites.sites) AS visible",
                )
            assert leak["pid"] == leaked_pid
            assert (leak["tenant"], leak["visible"]) == (tenant, 1), "a session-level SET should have leaked"
        finally:
            async with first.transaction():
                await first.execute("SELECT set_config('app.current_tenant_id', '', false)")

        pools = [p for p in pgbouncer.show("POOLS") if p["database"] == "solo"]
        assert len(pools) == 1
        assert int(pools[0]["cl_active"]) + int(pools[0]["cl_waiting"]) == 2, pools
        servers = [s for s in pgbouncer.show("SERVERS") if s["database"] == "solo"]
        assert len(servers) == 1, servers
    finally:
        await first.close()
        await second.close()


async def test_the_one_round_trip_binding_is_transaction_local_and_every_end_frees_the_server_session(
    pgbouncer: PgBouncer,
    admin: asyncpg.Connection[Any],
    sites: pb_grpc.SiteServiceStub,
    new_tenant: Callable[..., str],
    token: Callable[..., str],
) -> None:
    """Database.transaction through pgbouncer (one server session): BEGIN and the binding in one query,
    gone for the next client after COMMIT, ROLLBACK or a cancelled statement, never holding the session."""
    tenant = new_tenant("pgbone")
    sites.CreateSite(
        pb.CreateSiteRequest(site_id="ONE-1", site=pb.Site(name="only mine")),
        metadata=bearer(token(tenant)),
        timeout=10,
    )
    db = await Database.connect(pgbouncer.dsn("solo"), min_size=1, max_size=1, pool_mode=TRANSACTION_POOLING)
    other = await _connect(pgbouncer)
    sent: list[str] = []

    async def next_client_sees() -> asyncpg.Record:
        async with other.transaction():  # waits for the one server session: bounded, it must be free
            return await asyncio.wait_for(
                _row(
                    other,
                    "SELECT current_setting('app.current_tenant_id', true) AS tenant, pg_backend_pid() AS pid, "
                    "(SELECT count(*) FROM sites.sites) AS visible",
                ),
                10,
            )

    try:
        with context.bind(RequestContext(request_id=uuid.uuid4().hex, method="/test/Bound", tenant_id=tenant)):
            async with db.transaction(readonly=True) as conn:
                conn.add_query_logger(lambda query: sent.append(query.query))
                row = await _row(conn, "SELECT count(*) AS visible, pg_backend_pid() AS pid FROM sites.sites")
            assert row["visible"] == 1
            assert sent[-1] == "COMMIT"
            after = await next_client_sees()
            assert after["pid"] == row["pid"], "the clients did not share the server session: nothing proven"
            assert (after["tenant"], after["visible"]) in (("", 0), (None, 0))

            sent.clear()
            with pytest.raises(RuntimeError, match="the call failed"):
                async with db.transaction() as conn:
                    assert await conn.fetchval("SELECT count(*) FROM sites.sites") == 1
                    raise RuntimeError("the call failed")
            assert sent[0].startswith("BEGIN; SELECT set_config('app.current_tenant_id', ")  # one query, not three
            assert sent[-1] == "ROLLBACK"
            assert (await next_client_sees())["visible"] == 0

            async def slow() -> None:
                async with db.transaction() as conn:
                    await conn.execute("SELECT pg_sleep(4)")  # under the 5 s statement timeout

            task = asyncio.create_task(slow())
            for _ in range(100):  # until the statement runs (5 s at most)
                running = "SELECT pg_sleep(4)"
                if await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE query = $1", running):
                    break
                await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (await next_client_sees())["visible"] == 0
            async with db.transaction(readonly=True) as conn:  # and the pool's connection still serves
                assert await conn.fetchval("SELECT count(*) FROM sites.sites") == 1
    finally:
        await other.close()
        await db.close()


def test_a_service_left_in_session_mode_behind_pgbouncer_refuses_to_start_naming_db_pool_mode(
    stack: Stack, pgbouncer: PgBouncer
) -> None:
    services = ExtraServices(stack, OUTPUT / "logs")
    try:
        service = services.start("sites", {"SITES_DATABASE_URL": pgbouncer.dsn("towerco")}, wait=False)
        assert service.process.wait(60) == 2
    finally:
        services.stop()
    refusal = service.output().strip().splitlines()[-1]
    assert "unsupported startup parameter" in refusal, refusal
    assert "set DB_POOL_MODE=transaction" in refusal, refusal
