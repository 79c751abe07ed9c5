"""What the gRPC health check says, written by one object.

- ``""`` (the process): SERVING from start-up until shutdown begins, whatever the database
  does. It is the liveness check: restarting a process because PostgreSQL is down mends
  nothing and loses its warm caches.
- each gRPC service name of the process (``towerco.sites.v1.SiteService``, ...): SERVING
  only while its database answers AND the isolation canary finds no breach. It is the
  readiness check the gateway's (and a cluster's) health checks ask, so a replica whose
  database is unreachable gets no calls while it lasts, and gets them again when it is back.

:class:`DatabaseProbe` finds out whether the database answers: every second a ``SELECT 1``
on a connection of its own (not one of the pool's, so a pool busy with calls is not taken
for a database that is down), given a second to answer; two failures in a row make the
names NOT_SERVING, one answer SERVING again. Sent as a simple query, so it passes pgbouncer
in transaction mode as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from .db import UNREACHABLE

log = logging.getLogger("towerco.health")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
#: How often the database is asked, how long it has to answer, and how many probes in a row
#: must fail: a service name turns NOT_SERVING within about three seconds of the database
#: going away, while one slow answer (a busy moment) does not take every replica out at once.
PROBE_INTERVAL_SECONDS = 1.0
PROBE_TIMEOUT_SECONDS = 1.0
PROBE_FAILURES_BEFORE_NOT_READY = 2
#: What a probe may meet when the database cannot serve this role (down, refusing, timing out).
_PROBE_FAILURES: tuple[type[BaseException], ...] = (asyncpg.PostgresError, TimeoutError, *UNREACHABLE)


class HealthState:
    """The health check's one writer: the process is alive; its services are ready or not, and why."""

    def __init__(self, health: HealthServicer, service: str, names: Sequence[str]) -> None:
        self._health = health
        self._service = service
        self._names = tuple(names)
        #: Why the service names are NOT_SERVING, by cause ("database", "isolation"); empty: ready.
        self._reasons: dict[str, str] = {}
        self._published: int | None = None
        self._lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return not self._reasons

    async def serving(self) -> None:
        """Start-up is done: the process is SERVING, its service names as their causes say."""
        await self._health.set("", SERVING)
        await self._publish()

    async def database(self, reachable: bool, reason: str = "") -> None:
        await self._note("database", reachable, f"PostgreSQL unreachable ({reason})")

    async def isolation(self, isolated: bool) -> None:
        """The isolation canary's verdict (its report callback)."""
        await self._note("isolation", isolated, "the isolation canary found a breach")

    async def _note(self, cause: str, fine: bool, why: str) -> None:
        if fine:
            self._reasons.pop(cause, None)
        else:
            self._reasons[cause] = why
        await self._publish()

    async def _publish(self) -> None:
        async with self._lock:
            status = SERVING if self.ready else NOT_SERVING
            if status == self._published:
                return
            for name in self._names:
                await self._health.set(name, status)
            if self._published is not None or status != SERVING:
                if status == SERVING:
                    log.info("%s SERVING again: the database answers and no breach stands", self._service)
                else:
                    log.warning("%s NOT_SERVING: %s", self._service, "; ".join(self._reasons.values()))
            self._published = status


class DatabaseProbe:
    """Asks the database every ``interval`` seconds whether it answers, and tells ``report``."""

    def __init__(
        self,
        dsn: str,
        report: Callable[[bool, str], Awaitable[None]],
        *,
        application_name: str,
        interval: float = PROBE_INTERVAL_SECONDS,
        timeout: float = PROBE_TIMEOUT_SECONDS,
        failures_before_not_ready: int = PROBE_FAILURES_BEFORE_NOT_READY,
    ) -> None:
        self._dsn = dsn
        self._report = report
        self._application_name = application_name
        self._interval = interval
        self._timeout = timeout
        self._failures_before_not_ready = failures_before_not_ready
        self._conn: asyncpg.Connection[Any] | None = None
        #: Probes made, and how many failed, since start-up.
        self.probes = 0
        self.failures = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="database-probe")

    async def probe(self) -> str:
        """One probe: empty when the database answered, else what went wrong."""
        self.probes += 1
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(
                    self._dsn,
                    timeout=self._timeout,
                    statement_cache_size=0,
                    server_settings={"application_name": self._application_name},
                )
            await self._conn.execute("SELECT 1", timeout=self._timeout)
        except _PROBE_FAILURES as exc:
            self.failures += 1
            await self._drop()
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return ""

    async def _run(self) -> None:
        failed_in_a_row = 0
        while not self._stop.is_set():
            failure = await self.probe()
            failed_in_a_row = failed_in_a_row + 1 if failure else 0
            if not failure or failed_in_a_row >= self._failures_before_not_ready:
                await self._report(not failure, failure)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._interval)

    async def _drop(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        await self._drop()


def probe_name(service: str) -> str:
    """The probe connection's ``application_name``, beside the pool's ``towerco-<service>/<pid>``."""
    return f"towerco-{service}/{os.getpid()}/health"
