"""Tenant-bound database access: the only way a service reaches its data.

One asyncpg pool per process, made at start-up. :meth:`Database.transaction` opens a
transaction and binds the current call's tenant to it with
``set_config('app.current_tenant_id', $1, true)``: transaction-local, so it vanishes at
COMMIT or ROLLBACK and a pooled connection never carries one tenant into the next
request. Without a tenant in the request context it refuses to run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import asyncpg

from . import bulkhead, context, metrics, usage
from .errors import ErrorReason, unavailable
from .logs import Outage

log = logging.getLogger("towerco.platform")

BIND_TENANT = "SELECT set_config('app.current_tenant_id', $1, true)"
PLATFORM_READ = "SELECT set_config('app.platform_read', 'on', true)"
OUTBOX_RELAY = "SELECT set_config('app.audit_relay', 'on', true)"

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


async def _init_connection(conn: asyncpg.Connection[Any]) -> None:
    # JSON columns arrive as Python values, not text.
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


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


class Database:
    """A process's pool, handing out tenant-bound transactions only."""

    def __init__(self, pool: asyncpg.Pool[Any], acquire_timeout: float, heads: bulkhead.Bulkhead | None = None) -> None:
        self._pool = pool
        self._acquire_timeout = acquire_timeout
        #: Caps each tenant's share of the pool (when the call carries a limit).
        self.bulkhead = heads
        #: Whether PostgreSQL is reachable, as the last transaction found it; logs its outages.
        self.outage = Outage("PostgreSQL", log)
        self._refill_failures = _RefillFailures(self.outage)
        logging.getLogger("asyncpg.pool").addFilter(self._refill_failures)

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
    ) -> Database:
        """The pool; with ``tenant_wait_seconds``, a per-tenant bulkhead over it too."""
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            command_timeout=max(1.0, statement_timeout_ms / 1000 + 1),
            init=_init_connection,
            server_settings={
                "application_name": application_name,
                "statement_timeout": str(statement_timeout_ms),
                "idle_in_transaction_session_timeout": str(max(statement_timeout_ms * 2, 10_000)),
            },
        )
        heads = None if tenant_wait_seconds is None else bulkhead.Bulkhead(max_size, tenant_wait_seconds)
        return cls(pool, acquire_timeout, heads)

    @asynccontextmanager
    async def transaction(self, *, readonly: bool = False) -> AsyncIterator[asyncpg.Connection[Any]]:
        """A transaction bound to the current call's tenant (commit on success)."""
        tenant_id = context.current_tenant()
        limit = bulkhead.current_limit()
        if limit is None or self.bulkhead is None:
            async with self._tenant_open(tenant_id, readonly) as conn:
                yield conn
            return
        async with self.bulkhead.slot(tenant_id, limit), self._tenant_open(tenant_id, readonly) as conn:
            yield conn

    @asynccontextmanager
    async def _tenant_open(self, tenant_id: str, readonly: bool) -> AsyncIterator[asyncpg.Connection[Any]]:
        """A transaction bound to ``tenant_id``; the time it holds (or waits for) a connection is the tenant's."""
        started = time.perf_counter()
        try:
            async with self._open(BIND_TENANT, tenant_id, readonly=readonly) as conn:
                yield conn
        finally:
            if tenant_id not in context.CANARY_TENANTS:  # the canary's rounds are the platform's cost, no tenant's
                seconds = time.perf_counter() - started
                metrics.active().db_time(tenant_id, seconds)
                usage.active().db_time(tenant_id, seconds)

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
        self, statement: str, *args: object, readonly: bool = False
    ) -> AsyncIterator[asyncpg.Connection[Any]]:
        """A pooled connection in a transaction whose first statement sets its scope."""
        try:
            conn = await self._pool.acquire(timeout=self._acquire_timeout)
        except TimeoutError:
            raise unavailable(
                "all database connections are busy; retry shortly", ErrorReason.DATABASE_BUSY, 0.2
            ) from None
        except UNREACHABLE as exc:
            self.outage.failed(exc)
            metrics.active().dependency_error("postgres")
            raise
        try:
            async with conn.transaction(readonly=readonly):
                await conn.execute(statement, *args)
                self.outage.recovered()
                yield cast("asyncpg.Connection[Any]", conn)
        except UNREACHABLE as exc:
            self.outage.failed(exc)
            metrics.active().dependency_error("postgres")
            raise
        finally:
            await self._pool.release(conn)

    async def close(self, grace_seconds: float = 10.0) -> None:
        logging.getLogger("asyncpg.pool").removeFilter(self._refill_failures)
        try:
            await asyncio.wait_for(self._pool.close(), grace_seconds)
        except TimeoutError:
            self._pool.terminate()
