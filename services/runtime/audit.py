"""Audit events: written with the change they describe, delivered to the audit service later.

:meth:`Auditor.record` adds an event to the service's own ``audit_outbox`` table inside the
transaction that makes the change, so the change and its event commit together or not at
all. :class:`AuditRelay`, one background task per process, sends outbox rows in batches
to the audit service's internal ``WriteEvents`` (idempotent by ``event_id``) and deletes
them once acknowledged. With the audit service down, changes still succeed and their
events wait in the outbox; rows are claimed with ``FOR UPDATE SKIP LOCKED`` so several
replicas never send the same row at once, and a crash between send and delete only
causes a resend that the audit service ignores. While deliveries fail (the audit service
or the database away) the relay backs off exponentially, with jitter, up to
``max_retry_seconds``, ignoring the wake-ups of new events; it logs the outage once when
it starts and once when it ends. A delivery continues the trace of the call that recorded
the event (remembered by the process that recorded it; see :meth:`AuditRelay.wake`), so a
change and the delivery of its audit event are one trace.

Every service that changes data has the same outbox table, written once as a shared
migration (``services/runtime/sql/audit_outbox/``):
``audit_outbox(tenant_id, event_id, event bytea, create_time)``, tenant-bound by RLS like
every table, plus policies that let the relay's own transactions
(``Database.outbox_transaction``) read, lock and delete every tenant's rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
from google.protobuf import struct_pb2
from towerco.audit.v1 import audit_log_service_pb2 as audit_pb
from towerco.audit.v1 import audit_log_service_pb2_grpc as audit_grpc

from . import cells, context, metrics, tracing
from .channels import service_channel
from .db import Database
from .identity import ServiceIdentity

log = logging.getLogger("towerco.audit")

OUTCOME_OK = "OK"
#: Refused events a relay remembers to pass over; past this many, it sends them again.
MAX_REFUSED_REMEMBERED = 10_000
#: Traces of recorded events a relay remembers until they are delivered; past this, the oldest are forgotten.
MAX_TRACES_REMEMBERED = 10_000
OUTCOME_DENIED = "PERMISSION_DENIED"


#: The header the gateway sets, to the platform's gateway secret (``GATEWAY_SECRET``), on
#: every call it forwards: only a call that carries it may say in ``x-forwarded-for`` whom
#: it comes from. The gateway removes any client's copy (all ``x-towerco-*`` headers).
GATEWAY_HEADER = "x-towerco-gateway"


def forwarded_address(forwarded_for: str | None) -> str:
    """The last entry of ``x-forwarded-for`` (the one its sender appended), normalized; "" if none.

    Entries before it are whatever the client sent and prove nothing. Whether the last one
    is believed depends on who sent the call (see ``RequestContext.client_ip``).
    """
    if forwarded_for:
        return _normalized_address(forwarded_for.split(",")[-1].strip())
    return ""


@functools.lru_cache(maxsize=4096)
def _normalized_address(candidate: str) -> str:
    """``candidate`` as an IP address is written, "" if it is none; kept for the clients seen
    most recently: the gateway sends this header on every call, and parsing it costs 3 µs."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(candidate))
    return ""


def peer_address(peer: str) -> str:
    """The IP address of a gRPC peer such as ``ipv4:127.0.0.1:5555`` or ``ipv6:[::1]:5555``."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return ""


def event(
    action: str,
    resource: str,
    details: Mapping[str, Any] | None = None,
    *,
    outcome: str = OUTCOME_OK,
    tenant_id: str | None = None,
) -> audit_pb.AuditEvent:
    """An event about the call in progress: who, from where, under which request id."""
    ctx = context.current()
    caller = ctx.caller if ctx else None
    message = audit_pb.AuditEvent(
        event_id=str(uuid.uuid4()),
        tenant_id=tenant_id or context.current_tenant(),
        user_id=caller.subject if caller else "",
        action=action,
        resource=resource,
        ip_address=ctx.client_ip if ctx else "",
        request_id=ctx.request_id if ctx else "",
        outcome=outcome,
    )
    if details:
        message.details.CopyFrom(_struct(details))
    message.create_time.FromDatetime(datetime.now(UTC))
    return message


def _struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    result.update(dict(values))
    return result


class Auditor:
    """A service's way to record events: into its own outbox, in the change's transaction."""

    def __init__(self, db: Database, schema: str | None, relay: AuditRelay | None = None) -> None:
        self._db = db
        self._schema = schema
        self._relay = relay

    async def record(
        self,
        conn: asyncpg.Connection[Any],
        action: str,
        resource: str,
        details: Mapping[str, Any] | None = None,
        *,
        outcome: str = OUTCOME_OK,
    ) -> audit_pb.AuditEvent:
        """Add an event about the current call to the outbox, inside ``conn``'s transaction."""
        message = event(action, resource, details, outcome=outcome)
        await self._insert(conn, message)
        return message

    async def record_alone(self, message: audit_pb.AuditEvent) -> None:
        """Record an event that has no change of its own (a refused call), in its own transaction."""
        with context.system_scope(message.tenant_id, "audit.record"):
            async with self._db.transaction() as conn:
                await self._insert(conn, message)

    async def _insert(self, conn: asyncpg.Connection[Any], message: audit_pb.AuditEvent) -> None:
        if self._schema is None:
            raise RuntimeError("this service has no audit outbox")
        await conn.execute(
            f"INSERT INTO {self._schema}.audit_outbox (tenant_id, event_id, event) VALUES ($1, $2, $3)",
            message.tenant_id,
            uuid.UUID(message.event_id),
            message.SerializeToString(),
        )
        if self._relay is not None:
            self._relay.wake(uuid.UUID(message.event_id), tracing.carrier())


#: How often the relay measures its outbox (a count over the rows waiting).
MEASURE_SECONDS = 1.0


class AuditRelay:
    """Moves outbox rows to the audit service, in batches, until the process stops."""

    def __init__(
        self,
        db: Database,
        schema: str,
        target: str,
        identity: ServiceIdentity,
        *,
        service: str,
        batch_size: int = 200,
        idle_seconds: float = 0.2,
        retry_seconds: float = 0.5,
        max_retry_seconds: float = 30.0,
    ) -> None:
        self._db = db
        self._schema = schema
        self._service = service
        # gRPC's own reconnect backoff (up to 120 s by default) must not outlast the relay's.
        reconnect = ("grpc.max_reconnect_backoff_ms", int(max_retry_seconds * 1000))
        self._channel = service_channel(target, [reconnect], identity=identity)
        self._stub = audit_grpc.AuditLogServiceStub(self._channel)
        self._batch_size = batch_size
        self._idle_seconds = idle_seconds
        self._backoff = Backoff(retry_seconds, max_retry_seconds)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Outcomes, counted where they happen: events "delivered" and "refused", attempts "failed".
        self.counts: Counter[str] = Counter()
        #: Outbox rows the audit service refused (INVALID_ARGUMENT), not sent again by this process.
        self._refused: set[uuid.UUID] = set()
        #: The ``traceparent`` of the call that recorded each event still waiting, by event id.
        self._traces: dict[uuid.UUID, str] = {}
        self._outage_since: float | None = None
        self._failed_in_outage = 0
        self._measured_at = 0.0

    def wake(self, event_id: uuid.UUID | None = None, traceparent: str = "") -> None:
        """Something was just committed to the outbox: send it now rather than at the next poll.

        ``traceparent`` is the trace of the call that recorded ``event_id``: its delivery joins
        that trace. Only in this process's memory: an event another replica (or the next start)
        delivers is sent in a trace of its own; a rolled-back event's entry ages out.
        """
        if event_id is not None and traceparent:
            if len(self._traces) >= MAX_TRACES_REMEMBERED:
                del self._traces[next(iter(self._traces))]
            self._traces[event_id] = traceparent
        self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"audit-relay-{self._schema}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._channel.close(None)

    async def _run(self) -> None:
        delay = self._idle_seconds
        while True:
            await self._measure()
            try:
                sent = await self.deliver_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(exc)
                # New events do not cut the wait short: they wait in the outbox for the next try.
                await asyncio.sleep(self._backoff.next())
                continue
            more = sent >= self._batch_size
            if sent:
                more = more or self._outage_since is not None  # a probe got through: the rest follow at once
                # Only a delivery proves the way is open again (an empty outbox proves nothing).
                self._recovered()
                self.counts["delivered"] += sent
            delay = 0.0 if more else self._idle_seconds
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _measure(self) -> None:
        """The outbox's depth and the age of its oldest event, as metrics; at most once a second."""
        if time.monotonic() - self._measured_at < MEASURE_SECONDS:
            return
        self._measured_at = time.monotonic()
        request_id = f"audit-relay-{uuid.uuid4().hex[:12]}"
        try:
            with context.bind(context.background_context(self._service, "audit.relay", request_id)):
                async with self._db.outbox_transaction("audit.relay") as conn:
                    row = await conn.fetchrow(
                        "SELECT count(*) AS depth, "
                        "COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(create_time)), 0) AS lag "
                        f"FROM {self._schema}.audit_outbox"
                    )
        except Exception as exc:  # the database is down: the delivery that follows says so
            log.debug("audit relay: cannot measure the outbox (%s)", _short(exc))
            return
        assert row is not None
        metrics.active().outbox(int(row["depth"]), max(0.0, float(row["lag"])))

    def _failed(self, exc: BaseException) -> None:
        self.counts["failed"] += 1
        self._failed_in_outage += 1
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning(
                "audit relay: cannot deliver events (%s); they stay in the outbox, retrying with backoff up to %gs",
                _short(exc),
                self._backoff.cap,
            )
        else:
            log.debug("audit relay: delivery attempt %d failed (%s)", self._failed_in_outage, _short(exc))

    def _recovered(self) -> None:
        if self._outage_since is None:
            return
        log.warning(
            "audit relay: delivering again after %.1fs and %d failed attempts; the waiting events follow",
            time.monotonic() - self._outage_since,
            self._failed_in_outage,
        )
        self._outage_since = None
        self._failed_in_outage = 0
        self._backoff.reset()

    async def deliver_once(self) -> int:
        """Send one batch from each cell's outbox, deleting it once acknowledged; returns how many were sent.

        A cell that cannot be reached holds up only its own events: the others' are sent, and
        its failure is raised only when nothing was (its outage is logged where it is met).
        """
        sent, failure = 0, None
        for cell in self._db.cells:
            with cells.on_cell(cell):
                try:
                    sent += await self._deliver_from_cell()
                except Exception as exc:
                    failure = failure or exc
        if failure is not None and not sent:
            raise failure
        return sent

    async def _deliver_from_cell(self) -> int:
        """Send one batch of the current cell's outbox and delete it once acknowledged."""
        request_id = f"audit-relay-{uuid.uuid4().hex[:12]}"
        # While deliveries fail, each attempt is a probe: it locks and sends one row, not a batch.
        limit = 1 if self._outage_since is not None else self._batch_size
        with context.bind(context.background_context(self._service, "audit.relay", request_id)):
            async with self._db.outbox_transaction("audit.relay") as conn:
                rows = await conn.fetch(
                    f"SELECT tenant_id, event_id, event FROM {self._schema}.audit_outbox "
                    "WHERE event_id <> ALL($2::uuid[]) "
                    "ORDER BY create_time, tenant_id, event_id LIMIT $1 FOR UPDATE SKIP LOCKED",
                    limit,
                    list(self._refused),
                )
                if not rows:
                    return 0
                events = [audit_pb.AuditEvent.FromString(row["event"]) for row in rows]
                traces = [self._traces.get(row["event_id"], "") for row in rows]
                with tracing.resumed("audit.relay", traces, **{"audit.events": len(rows)}):
                    try:
                        await self._stub.WriteEvents(audit_pb.WriteEventsRequest(events=events), timeout=10)
                        delivered = list(rows)
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                            raise
                        # One bad event must not hold up every later one: send them one by one.
                        delivered = await self._deliver_each(rows, events)
                await conn.execute(
                    f"DELETE FROM {self._schema}.audit_outbox "
                    "WHERE (tenant_id, event_id) IN (SELECT * FROM unnest($1::text[], $2::uuid[]))",
                    [row["tenant_id"] for row in delivered],
                    [row["event_id"] for row in delivered],
                )
        for row in delivered:
            self._traces.pop(row["event_id"], None)
        return len(delivered)

    async def _deliver_each(self, rows: list[Any], events: list[audit_pb.AuditEvent]) -> list[Any]:
        delivered = []
        for row, message in zip(rows, events, strict=True):
            try:
                await self._stub.WriteEvents(audit_pb.WriteEventsRequest(events=[message]), timeout=10)
                delivered.append(row)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                # Kept in the outbox (nothing is dropped) for someone to repair, and passed over
                # from now on: it must not block the batches (or the probes) behind it, nor be
                # reported again on every poll. The next start of the process tries it again.
                if len(self._refused) < MAX_REFUSED_REMEMBERED:
                    self._refused.add(row["event_id"])
                self.counts["refused"] += 1
                log.error(
                    "audit relay: the audit service refuses event %s (%s): %s; it stays in the outbox",
                    message.event_id,
                    message.action,
                    exc.details(),
                )
        return delivered


class Backoff:
    """Exponential waits with jitter: ``base``, then doubling up to ``cap``, each 50-100% of its step.

    The jitter keeps the replicas of every service from retrying in step after a shared outage.
    """

    def __init__(self, base: float, cap: float) -> None:
        self.base = base
        self.cap = cap
        self._step = base

    def next(self) -> float:
        wait = self._step * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret
        self._step = min(self.cap, self._step * 2)
        return wait

    def reset(self) -> None:
        self._step = self.base


def _short(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    if callable(details):
        return f"{type(exc).__name__}: {details()}"
    return f"{type(exc).__name__}: {exc}"[:200]
