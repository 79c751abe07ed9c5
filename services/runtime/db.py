"""Tenant-bound database access: the only way a service reaches its data.

One asyncpg pool per process and database cell (``services/runtime/cells.py``), made at
start-up; a tenant's transactions open on its cell's, as the cached tenant state names it.
:meth:`Database.transaction` opens a transaction and binds the current call's tenant to it with
``set_config('app.current_tenant_id', '<tenant>', true)``, sent with the ``BEGIN`` as one
simple query (:func:`bind_tenant`, one round trip): transaction-local, so it vanishes at
COMMIT or ROLLBACK and a pooled connection never carries one tenant into the next
request. Without a tenant in the request context it refuses to run.

Since nothing a call sets outlives its transaction, the pool may reach PostgreSQL through
pgbouncer in transaction mode (``DB_POOL_MODE=transaction``, see :func:`connect_options`).
Given a read DSN, a second pool on a streaming replica serves the read-only transactions
of read RPCs (:meth:`Database.route_reads`), bound to the tenant the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import asyncpg

from . import bulkhead, cells, context, metrics, usage
from .errors import ErrorReason, ServiceError, unavailable
from .logs import Outage

log = logging.getLogger("towerco.platform")

BIND_TENANT = "SELECT set_config('app.current_tenant_id', $1, true)"
BIND_TENANT_WRITABLE = "SELECT set_config('app.current_tenant_id', $1, true), platform_meta.require_writable($1)"
PLATFORM_READ = "SELECT set_config('app.platform_read', 'on', true)"
OUTBOX_RELAY = "SELECT set_config('app.audit_relay', 'on', true)"
#: On the replica, when the tenant has a write the replica must have replayed: how far it has.
REPLAYED = "SELECT pg_last_wal_replay_lsn()::text"
#: Where the primary's WAL is: past the commit record of every transaction committed before.
WAL_POSITION = "SELECT pg_current_wal_insert_lsn()::text"
#: Reads of a tenant whose last write's position is unknown go to the primary.
_UNKNOWN_POSITION = 2**64 - 1

#: ``DB_POOL_MODE``: how the DSNs reach PostgreSQL (see :func:`connect_options`).
SESSION_POOLING = "session"
TRANSACTION_POOLING = "transaction"
POOL_MODES = (SESSION_POOLING, TRANSACTION_POOLING)

#: Failures that mean the database cannot be reached (down, restarting, out of connections,
#: a connection cut), not that a statement was wrong: calls meeting them are answered
#: UNAVAILABLE, and the outage is logged once, not per call.
UNREACHABLE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # ConnectionDoesNotExistError among them
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    OSError,  # refused, reset, unreachable, timed out
)
#: What sends a read back to the primary: the replica's pool exhausted or the replica unreachable.
_REPLICA_DOWN: tuple[type[BaseException], ...] = (TimeoutError, *UNREACHABLE)


async def init_connection(conn: asyncpg.Connection[Any]) -> None:
    # JSON columns arrive as Python values, not text.
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


def connect_options(pool_mode: str, statement_timeout_ms: int, application_name: str) -> dict[str, Any]:
    """asyncpg's connection options for ``pool_mode`` (``DB_POOL_MODE``).

    ``session``: a connection is one server session for its life: statements are prepared
    once and cached, and the timeouts are start-up parameters.

    ``transaction`` (pgbouncer's ``pool_mode = transaction``): each transaction may run on
    another server session, so nothing may outlive one. No prepared-statement cache
    (Debian's pgbouncer 1.18 keeps no prepared statement across server sessions; 1.21's
    ``max_prepared_statements`` would), no start-up parameter but ``application_name``
    (pgbouncer refuses the others), and the timeouts set in each transaction instead
    (:func:`local_timeouts`). Every statement must run inside a transaction: asyncpg parses
    and executes in two round trips, which pgbouncer keeps on one server session only there.
    """
    if pool_mode not in POOL_MODES:
        raise ValueError(f"DB_POOL_MODE must be one of {', '.join(POOL_MODES)}, got {pool_mode!r}")
    if pool_mode == TRANSACTION_POOLING:
        return {"statement_cache_size": 0, "server_settings": {"application_name": application_name}}
    return {"server_settings": {"application_name": application_name, **_timeouts(statement_timeout_ms)}}


def local_timeouts(statement_timeout_ms: int) -> str:
    """The timeouts as more columns of a transaction's first statement, transaction-local like the binding."""
    return "".join(
        f", set_config('{name}', '{value}', true)" for name, value in _timeouts(statement_timeout_ms).items()
    )


def _timeouts(statement_timeout_ms: int) -> dict[str, str]:
    return {
        "statement_timeout": str(statement_timeout_ms),
        "idle_in_transaction_session_timeout": str(max(statement_timeout_ms * 2, 10_000)),
    }


async def _leave_server_session(conn: asyncpg.Connection[Any]) -> None:
    """What a connection going back to the pool sends: nothing (asyncpg's own state is reset).

    asyncpg's default reset (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``)
    is one more round trip on every release, for session state no call leaves: every
    transaction is ended before the release (or its connection terminated), and what a
    call sets is transaction-local (the binding, the timeouts under transaction pooling,
    ``pg_advisory_xact_lock``, ``SET LOCAL``). Under transaction pooling it would moreover run
    on whichever server session pgbouncer picked: the session is pgbouncer's to reset.
    """


def quote_literal(value: str) -> str:
    """``value`` as a PostgreSQL string literal, written as PostgreSQL's own ``quote_literal()`` writes it.

    Quotes doubled; with a backslash, an ``E''`` literal with backslashes doubled, so the
    result means ``value`` whatever ``standard_conforming_strings`` says.
    """
    if "\x00" in value:
        raise ValueError("a PostgreSQL string cannot hold a NUL character")
    quoted = "'" + value.replace("'", "''") + "'"
    return "E" + quoted.replace("\\", "\\\\") if "\\" in value else quoted


def bind_tenant(tenant_id: str) -> str:
    """:data:`BIND_TENANT` with ``tenant_id`` quoted in: a statement to send with ``BEGIN`` in one simple query."""
    return f"SELECT set_config('app.current_tenant_id', {quote_literal(tenant_id)}, true)"


def require_writable(tenant_id: str) -> str:
    """More columns for a write transaction's first statement: refused (SQLSTATE :data:`TENANT_AWAY`)
    while ``tenant_id`` is moving out of this cell or has moved (services/runtime/migrations.py)."""
    return f", platform_meta.require_writable({quote_literal(tenant_id)})"


#: SQLSTATE of a write refused because its tenant is moving out of the cell, or has moved.
TENANT_AWAY = "TM001"


def tenant_moving() -> ServiceError:
    """What a write refused by the barrier of a tenant moving between cells is answered."""
    return unavailable(
        "the tenant is moving to another database cell and takes no writes for a few seconds; retry shortly",
        ErrorReason.TENANT_MOVING,
        1.0,
    )


def _begin(readonly: bool, scope: str) -> str:
    """One simple query: ``BEGIN`` and the statement setting the transaction's scope (one round trip, not two)."""
    return f"BEGIN READ ONLY; {scope}" if readonly else f"BEGIN; {scope}"


class _Transaction:
    """``async with _Transaction(conn, begin):`` run ``begin`` (see :func:`_begin`), the block, then
    ``COMMIT``; ``ROLLBACK`` if the block (or ``begin``) raised.

    The transaction is ours, not asyncpg's (``Connection.transaction()`` would send
    ``BEGIN`` alone): a connection whose transaction may still be open (``ROLLBACK``
    failed, cancelled during ``COMMIT``, the link cut) is terminated, for the pool to
    replace. Released mid-transaction, the next call would run in it (under transaction
    pooling the pool's reset sends nothing). Nested blocks: :func:`savepoint`. A class, not
    an async generator: every tenant transaction enters one.
    """

    __slots__ = ("_begin", "_conn")

    def __init__(self, conn: Any, begin: str) -> None:
        self._conn = conn
        self._begin = begin

    async def __aenter__(self) -> None:
        try:
            await self._conn.execute(self._begin)
        except BaseException:
            await self._roll_back()
            raise

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        if kind is not None:
            await self._roll_back()
            return  # the block's error goes on
        conn, ended = self._conn, False
        try:
            await conn.execute("COMMIT")
            ended = True
        except asyncpg.PostgresError:
            ended = True  # refused at COMMIT (a deferred check, serialization): PostgreSQL rolled it back
            raise
        finally:
            if not ended or conn.is_in_transaction():
                conn.terminate()

    async def _roll_back(self) -> None:
        conn, ended = self._conn, False
        try:
            if not conn.is_closed():
                with contextlib.suppress(Exception):  # the block's error is the one to report
                    await conn.execute("ROLLBACK")
                    ended = True
        finally:
            if not ended or conn.is_in_transaction():
                conn.terminate()


@asynccontextmanager
async def savepoint(conn: asyncpg.Connection[Any]) -> AsyncIterator[None]:
    """A savepoint in a :meth:`Database.transaction`: an error in the block undoes the block only.

    (``conn.transaction()`` cannot nest in a transaction asyncpg did not open.)
    """
    await conn.execute("SAVEPOINT nested")
    try:
        yield
    except BaseException:
        await conn.execute("ROLLBACK TO SAVEPOINT nested")
        raise
    await conn.execute("RELEASE SAVEPOINT nested")


def _lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


class _RefillFailures(logging.Filter):
    """asyncpg logs each failed attempt to refill the pool to its minimum size, with a traceback.

    An unreachable database is the outage, already logged once: such a record is reported
    to it instead. Any other failure (a wrong password) is logged as asyncpg wrote it.
    """

    def __init__(self, outage: Outage) -> None:
        super().__init__()
        self._outage = outage

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, UNREACHABLE):
            self._outage.failed(error)
            metrics.active().dependency_error("postgres")
            return False
        return True


T = TypeVar("T")

#: Which cell a tenant's rows live in ("" or an unknown tenant: the home cell), from the cached tenant state.
CellOf = Callable[[str], Awaitable[str]]


@dataclass(frozen=True)
class CellPool:
    """One cell's pool in this process, with the cell's own bulkhead and outage."""

    name: str
    pool: asyncpg.Pool[Any]
    bulkhead: bulkhead.Bulkhead | None
    outage: Outage


class Database:
    """A process's pools, one per database cell, handing out tenant-bound transactions only."""

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        acquire_timeout: float,
        heads: bulkhead.Bulkhead | None = None,
        *,
        read_pool: asyncpg.Pool[Any] | None = None,
        local_settings: str = "",
        home_cell: str = cells.DEFAULT_CELL,
        other_cells: Iterable[CellPool] = (),
        write_barrier: bool = False,
    ) -> None:
        self._pool = pool
        #: Whether write transactions pass the barrier of a tenant moving out of its cell (the
        #: services keeping rows in the tenant's cell; not the registry, whose rows stay home).
        self._write_barrier = write_barrier
        #: On a streaming replica: the read-only transactions of the methods :meth:`route_reads` names.
        self._read_pool = read_pool
        self._replica_methods: frozenset[str] = frozenset()
        #: Each tenant's last write through this process: the primary's WAL position after it.
        self._written: dict[str, int] = {}
        #: More columns of each transaction's first statement (transaction pooling: the timeouts).
        self._local_settings = local_settings
        self._acquire_timeout = acquire_timeout
        #: Caps each tenant's share of the pool (when the call carries a limit).
        self.bulkhead = heads
        #: Whether PostgreSQL is reachable, as the last transaction found it; logs its outages.
        self.outage = Outage("PostgreSQL", log)
        #: The replica's outages: its reads go to the primary meanwhile.
        self.replica_outage = Outage("PostgreSQL read replica", log)
        self._refill_failures = _RefillFailures(self.outage)
        logging.getLogger("asyncpg.pool").addFilter(self._refill_failures)
        #: The home cell (this pool, bulkhead and outage) first, then every other cell's.
        self.home_cell = home_cell
        self._cells: dict[str, CellPool] = {home_cell: CellPool(home_cell, pool, heads, self.outage)}
        self._cells.update((cell.name, cell) for cell in other_cells)
        self._cell_of: CellOf | None = None
        #: Cells whose isolation guard has not run yet (down at start-up): refused until it passes.
        self._unguarded: set[str] = set()
        #: Read-only transactions whose COMMIT is still on its way (``commit_behind``): kept until it ends.
        self._committing: set[asyncio.Task[None]] = set()

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        min_size: int,
        max_size: int,
        acquire_timeout: float = 2.0,
        statement_timeout_ms: int = 5000,
        application_name: str = "towerco",
        tenant_wait_seconds: float | None = None,
        pool_mode: str = SESSION_POOLING,
        read_dsn: str = "",
        home_cell: str = cells.DEFAULT_CELL,
        cell_dsns: Mapping[str, str] | None = None,
        write_barrier: bool = False,
    ) -> Database:
        """The pool, and one on ``read_dsn`` (a replica) if given; with ``tenant_wait_seconds``,
        a per-tenant bulkhead over the primary's too.

        ``dsn`` is the home cell's; ``cell_dsns`` each other cell's, whose pools open their
        connections when first needed (no minimum), so a cell that is down at start-up does
        not stop the process: its tenants' calls are UNAVAILABLE until it is back."""
        options: dict[str, Any] = {
            "min_size": min_size,
            "max_size": max_size,
            "command_timeout": max(1.0, statement_timeout_ms / 1000 + 1),
            "init": init_connection,
            "reset": _leave_server_session,
            **connect_options(pool_mode, statement_timeout_ms, application_name),
        }
        local_settings = ""
        if pool_mode == TRANSACTION_POOLING:
            local_settings = local_timeouts(statement_timeout_ms)
        pool = await asyncpg.create_pool(dsn, **options)
        read_pool = None
        if read_dsn:
            try:
                read_pool = await asyncpg.create_pool(read_dsn, **options)
            except BaseException:
                await pool.close()
                raise

        def heads() -> bulkhead.Bulkhead | None:
            return None if tenant_wait_seconds is None else bulkhead.Bulkhead(max_size, tenant_wait_seconds)

        others = [
            CellPool(
                name,
                await asyncpg.create_pool(cell_dsn, **{**options, "min_size": 0}),
                heads(),
                Outage(f"PostgreSQL cell {name}", log),
            )
            for name, cell_dsn in (cell_dsns or {}).items()
        ]
        return cls(
            pool,
            acquire_timeout,
            heads(),
            read_pool=read_pool,
            local_settings=local_settings,
            home_cell=home_cell,
            other_cells=others,
            write_barrier=write_barrier,
        )

    @property
    def cells(self) -> tuple[str, ...]:
        """The cells this process reaches, the home cell first: platform paths run once in each."""
        return tuple(self._cells)

    def hold_until_guarded(self, names: Iterable[str]) -> None:
        """Refuse cells ``names`` (as unreachable) until :meth:`guarded` names each (services/runtime/cell_guard.py)."""
        self._unguarded.update(names)

    def guarded(self, name: str) -> None:
        self._unguarded.discard(name)

    def route_cells(self, cell_of: CellOf) -> None:
        """Open each tenant's transactions on the cell ``cell_of`` names (with more than one cell).

        ``cell_of`` reads the tenant state every service caches (memory first, and already
        read by the tenant-state check of the same call), so choosing the pool adds no round trip.
        """
        self._cell_of = cell_of

    async def in_each_cell(self, work: Callable[[str], Awaitable[T]]) -> list[T]:
        """``work(cell)`` once in each cell (:func:`cells.on_cell`), for platform paths; what each returned.

        A cell other than the home one that cannot be reached is left out (its outage is
        logged where it was met): its tenants wait for the next round, the others do not.
        """
        done: list[T] = []
        for cell in self._cells:
            if cell in self._unguarded:
                continue
            with cells.on_cell(cell):
                try:
                    done.append(await work(cell))
                except UNREACHABLE:
                    if cell == self.home_cell:
                        raise
        return done

    async def cell_of(self, tenant_id: str) -> str:
        """The cell of ``tenant_id``'s rows (the one :func:`cells.on_cell` chose, if any)."""
        return (await self._tenant_cell(tenant_id)).name

    async def _tenant_cell(self, tenant_id: str) -> CellPool:
        chosen = cells.chosen_cell()
        if chosen is None and self._cell_of is not None and len(self._cells) > 1:
            chosen = await self._cell_of(tenant_id)
        return self._cell(chosen)

    def _cell(self, name: str | None) -> CellPool:
        """The pool of cell ``name``; None or "": the home cell's."""
        cell = self._cells.get(name or self.home_cell)
        if cell is None or cell.name in self._unguarded:
            if cell is None:  # a placement this process has no DSN for: its configuration lags the registry's
                log.error("a tenant is placed in cell %s, which this process has no DSN for (CELLS)", name)
            raise unavailable("the tenant's data cannot be reached; retry later", ErrorReason.DATABASE_UNAVAILABLE)
        return cell

    def route_reads(self, methods: Iterable[str]) -> None:
        """Serve the read-only tenant transactions of ``methods`` from the replica, if there is one.

        The caller names the read RPCs that no write, quota check or migration depends on.
        Even for those the primary serves a tenant whose last write through this process
        the replica has not replayed yet (read-your-writes), and any read the replica
        cannot take (unreachable).
        """
        self._replica_methods = frozenset(methods)

    def transaction(self, *, readonly: bool = False, commit_behind: bool = False) -> TenantTransaction:
        """``async with db.transaction() as conn:`` a transaction bound to the current call's tenant
        (commit on success), within the tenant's database slots when the call has a limit.

        ``commit_behind`` (read-only only): a block that ends without an error leaves at once
        and its ``COMMIT`` runs on behind it, so a read's answer goes out during that round trip
        instead of after it. What the block read stands either way (a read-only transaction
        changes nothing, and its snapshot was taken before); the connection, the tenant's slot
        and its database time are held until the ``COMMIT`` has ended, as without it. For a
        call's one read whose result is all it answers; not where the next statement must
        follow the read (the tenant's slots would make it wait for the ``COMMIT`` anyway).
        """
        if commit_behind and not readonly:
            raise ValueError("commit_behind is for read-only transactions: a write's COMMIT is its outcome")
        return TenantTransaction(self, readonly, commit_behind)

    def _commit_behind(self, finishing: Awaitable[object]) -> None:
        task = asyncio.get_running_loop().create_task(_finish_behind(finishing))
        self._committing.add(task)
        task.add_done_callback(self._committing.discard)

    async def committed(self) -> None:
        """Wait for the ``COMMIT`` of every read-only transaction still ending behind its block."""
        while self._committing:
            await asyncio.gather(*self._committing, return_exceptions=True)

    def _tenant_open(
        self, tenant_id: str, readonly: bool, cell: CellPool
    ) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection[Any]]:
        """A transaction bound to ``tenant_id``: on the replica if the call's reads are routed there, else the primary.

        Not a generator around :meth:`_open`: every call's transaction enters it (the time it
        holds a connection is the tenant's, counted by :class:`TenantTransaction`).
        """
        if readonly and cell.name == self.home_cell and self._routed_to_replica():
            return self._replica_or_primary(tenant_id, cell)
        return self._primary_open(tenant_id, readonly, cell)

    def _primary_open(
        self, tenant_id: str, readonly: bool, cell: CellPool
    ) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection[Any]]:
        scope = bind_tenant(tenant_id)
        if not readonly and self._write_barrier:
            scope += require_writable(tenant_id)
        return self._open(scope, readonly=readonly, written=None if readonly else tenant_id, cell=cell)

    @asynccontextmanager
    async def _replica_or_primary(self, tenant_id: str, cell: CellPool) -> AsyncIterator[asyncpg.Connection[Any]]:
        async with self._replica_transaction(tenant_id) as conn:
            if conn is not None:
                yield conn
                return
        async with self._primary_open(tenant_id, True, cell) as conn:
            yield conn

    def _tenant_time(self, tenant_id: str, started: float) -> None:
        """The time a tenant transaction held (or waited for) a connection: the tenant's."""
        if tenant_id not in context.CANARY_TENANTS:  # the canary's rounds are the platform's cost, no tenant's
            seconds = time.perf_counter() - started
            metrics.active().db_time(tenant_id, seconds)
            usage.active().db_time(tenant_id, seconds)

    def _routed_to_replica(self) -> bool:
        ctx = context.current()
        return self._read_pool is not None and ctx is not None and ctx.method in self._replica_methods

    @asynccontextmanager
    async def _replica_transaction(self, tenant_id: str) -> AsyncIterator[asyncpg.Connection[Any] | None]:
        """A READ ONLY transaction on the replica bound to ``tenant_id``; None when the primary must serve.

        None when the replica has not replayed the tenant's last write through this process,
        or cannot be reached (its outage logged once).
        """
        assert self._read_pool is not None
        try:
            conn: Any = await self._read_pool.acquire(timeout=self._acquire_timeout)
        except _REPLICA_DOWN as exc:
            self._replica_failed(exc)
            yield None
            return
        served = False
        try:
            async with _Transaction(conn, _begin(True, bind_tenant(tenant_id) + self._local_settings)):
                replayed = await conn.fetchval(REPLAYED) if tenant_id in self._written else None
                self.replica_outage.recovered()
                served = self._replayed_writes_of(tenant_id, replayed)
                if served:
                    yield conn
        except UNREACHABLE as exc:
            if served:
                raise
            self._replica_failed(exc)  # the connection is gone or terminated (see _Transaction)
        finally:
            await self._read_pool.release(conn)
        if not served:
            yield None

    def _replica_failed(self, error: BaseException) -> None:
        self.replica_outage.failed(error)
        metrics.active().dependency_error("postgres_replica")

    def _replayed_writes_of(self, tenant_id: str, replayed: str | None) -> bool:
        """Whether the replica, having replayed up to ``replayed``, shows the tenant's writes through this process."""
        written = self._written.get(tenant_id)
        if written is None or replayed is None:  # nothing written here, or the read DSN names a primary
            return True
        if _lsn(replayed) < written:
            return False
        if self._written.get(tenant_id) == written:
            del self._written[tenant_id]  # caught up: later reads need not look
        return True

    async def _note_written(self, conn: Any, tenant_id: str) -> None:
        """After a tenant's commit: remember where the primary's WAL is, which the replica must pass to serve it."""
        try:
            async with conn.transaction(readonly=True):  # inside one: a transaction pooler may switch sessions
                position = _lsn(await conn.fetchval(WAL_POSITION))
        except UNREACHABLE:
            position = _UNKNOWN_POSITION  # committed, but where is unknown: the primary serves its reads
        self._written[tenant_id] = max(position, self._written.get(tenant_id, 0))

    async def rebind_tenant(self, conn: asyncpg.Connection[Any], tenant_id: str, purpose: str) -> None:
        """Bind ``tenant_id`` to ``conn``'s open transaction in place of the one bound so far.

        For the one platform-service write that spans tenants atomically: the audit
        service's ``WriteEvents`` appends a batch of several tenants' events in one
        transaction, re-binding each tenant before touching its rows, so RLS still shows
        and accepts that tenant's rows only. Allowed only for a platform service caller,
        only inside a transaction (the binding stays transaction-local), and logged (DEBUG).
        """
        caller = context.current_caller()
        if caller is None or not caller.service:
            raise context.PlatformScopeError(f"{purpose}: re-binding a transaction's tenant needs a platform service")
        if not context.is_valid_tenant_id(tenant_id):
            raise context.PlatformScopeError(f"{purpose}: not a tenant id: {tenant_id!r}")
        if not conn.is_in_transaction():
            raise RuntimeError(f"{purpose}: rebind_tenant needs an open transaction (the binding is transaction-local)")
        ctx = context.current()
        # DEBUG: the audit service passes here for every tenant of every batch it is sent.
        log.debug(
            "platform path %s: %s binds tenant %s (request %s)",
            purpose,
            caller.subject,
            tenant_id,
            ctx.request_id if ctx else "-",
        )
        if self._write_barrier:
            try:
                await conn.execute(BIND_TENANT_WRITABLE, tenant_id)
            except asyncpg.PostgresError as exc:
                if exc.sqlstate == TENANT_AWAY:
                    raise tenant_moving() from None
                raise
        else:
            await conn.execute(BIND_TENANT, tenant_id)

    @asynccontextmanager
    async def platform_read(self, purpose: str) -> AsyncIterator[asyncpg.Connection[Any]]:
        """A READ ONLY transaction that may read across tenants where a table allows it.

        Only tables with a ``platform_read`` policy (the registry's directory of tenants
        and hosts) show every tenant's rows in it; it binds no tenant, so every other table
        shows none. It is logged (DEBUG) with its purpose, and nothing can be written.
        """
        ctx = context.current()
        log.debug("platform read %s (request %s)", purpose, ctx.request_id if ctx else "-")
        async with self._open(PLATFORM_READ, readonly=True) as conn:
            yield conn

    @asynccontextmanager
    async def outbox_transaction(self, purpose: str) -> AsyncIterator[asyncpg.Connection[Any]]:
        """A transaction for the audit relay: only ``audit_outbox`` shows every tenant in it.

        The outbox's ``audit_relay`` policy lets this transaction read and delete the
        events of all tenants (to hand them to the audit service); every other table
        still shows no tenant's rows, since no tenant is bound.
        """
        log.debug("outbox transaction %s", purpose)
        async with self._open(OUTBOX_RELAY) as conn:
            yield conn

    @asynccontextmanager
    async def _open(
        self, scope: str, *, readonly: bool = False, written: str | None = None, cell: CellPool | None = None
    ) -> AsyncIterator[asyncpg.Connection[Any]]:
        """A pooled connection in a transaction whose first statement, ``scope``, sets its scope.

        ``scope`` goes with the ``BEGIN`` in one round trip, so it takes no parameters (see :func:`bind_tenant`).
        ``written``: the tenant whose write this is; with a replica, its WAL position is noted after the commit.
        """
        cell = cell or self._cell(cells.chosen_cell())  # a platform path: the cell it runs on, else home
        try:
            if idle_at_hand(cell.pool):  # nothing to wait for: no timer to arm and cancel (4 µs a call)
                conn = await cell.pool.acquire()
            else:
                # Not acquire(timeout=...): asyncpg then waits in a task of its own (asyncio.wait_for), made per call.
                async with asyncio.timeout(self._acquire_timeout):
                    conn = await cell.pool.acquire()
        except TimeoutError:
            raise unavailable(
                "all database connections are busy; retry shortly", ErrorReason.DATABASE_BUSY, 0.2
            ) from None
        except UNREACHABLE as exc:
            cell.outage.failed(exc)
            metrics.active().dependency_error("postgres")
            raise
        try:
            try:
                async with _Transaction(conn, _begin(readonly, scope + self._local_settings)):
                    cell.outage.recovered()
                    yield cast("asyncpg.Connection[Any]", conn)
            except asyncpg.PostgresError as exc:
                if exc.sqlstate == TENANT_AWAY:  # the BEGIN's barrier, or a statement of the block's
                    raise tenant_moving() from None
                raise
            if written is not None and self._read_pool is not None and cell.name == self.home_cell:
                await self._note_written(conn, written)
        except UNREACHABLE as exc:
            cell.outage.failed(exc)
            metrics.active().dependency_error("postgres")
            raise
        finally:
            await cell.pool.release(conn)

    async def close(self, grace_seconds: float = 10.0) -> None:
        logging.getLogger("asyncpg.pool").removeFilter(self._refill_failures)
        await self.committed()
        for pool in (*(cell.pool for cell in self._cells.values()), self._read_pool):
            if pool is None:
                continue
            try:
                await asyncio.wait_for(pool.close(), grace_seconds)
            except TimeoutError:
                pool.terminate()


def idle_at_hand(pool: asyncpg.Pool[Any]) -> bool:
    """Whether ``pool.acquire()`` hands over an open connection at once, without waiting for one.

    asyncpg keeps its free connection holders in a last-in-first-out queue; the one on top is
    handed over without an await that could block when it holds an open connection of the
    pool's current generation (else asyncpg connects first). Read from asyncpg's internals
    (pinned in the lock file), so anything unexpected answers False: the acquire is timed.
    """
    try:
        free = pool._queue._queue  # type: ignore[attr-defined]  # asyncpg's LifoQueue of holders: a list
        if not free:
            return False
        holder = free[-1]
        con = holder._con
        return con is not None and holder._generation == pool._generation and not con.is_closed()  # type: ignore[attr-defined]
    except AttributeError:
        return False


class TenantTransaction:
    """:meth:`Database.transaction`: the tenant's slot (if the call has a limit), then its transaction.

    A class, not an async generator around the two: every call's transactions enter one.
    """

    __slots__ = ("_behind", "_db", "_opened", "_readonly", "_slot", "_started", "_tenant_id")

    def __init__(self, db: Database, readonly: bool, behind: bool = False) -> None:
        self._db = db
        self._readonly = readonly
        self._behind = behind

    async def __aenter__(self) -> asyncpg.Connection[Any]:
        db = self._db
        tenant_id = context.current_tenant()
        cell = await db._tenant_cell(tenant_id)
        limit = bulkhead.current_limit()
        slot = None if limit is None or cell.bulkhead is None else cell.bulkhead.slot(tenant_id, limit)
        if slot is not None:
            await slot.__aenter__()
        started = time.perf_counter()
        opened = db._tenant_open(tenant_id, self._readonly, cell)
        try:
            conn = await opened.__aenter__()
        except BaseException:
            db._tenant_time(tenant_id, started)
            if slot is not None:
                await slot.__aexit__(None, None, None)
            raise
        self._slot, self._opened, self._tenant_id, self._started = slot, opened, tenant_id, started
        return conn

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> bool | None:
        if self._behind and kind is None:
            self._db._commit_behind(self._end(None, None, None))
            return None
        return await self._end(kind, error, tb)

    async def _end(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> bool | None:
        try:
            try:
                return await self._opened.__aexit__(kind, error, tb)
            finally:
                self._db._tenant_time(self._tenant_id, self._started)
        finally:
            if self._slot is not None:
                await self._slot.__aexit__(kind, error, tb)


async def _finish_behind(finishing: Awaitable[object]) -> None:
    """A ``commit_behind`` transaction's end; its answer has gone, so a failure is only logged
    (the connection is terminated or its outage noted by the transaction, as for any other)."""
    try:
        await finishing
    except Exception:
        log.warning("a read-only transaction's COMMIT failed after its answer was sent", exc_info=True)
