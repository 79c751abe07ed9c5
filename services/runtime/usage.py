"""Usage metering: what each tenant used, counted in memory on the request path, flushed exactly.

Every service process has one :class:`UsageMeter` (:func:`active`). A call of a tenant's
user adds to its counters, by tenant, UTC hour and counter (``read_calls``,
``write_calls``, ``rate_limited``, ``plan_refused``, ``calls_limited``, ``db_microseconds``,
``feature:<name>``): a dict increment, no I/O. Every ``USAGE_FLUSH_SECONDS``, and once
more on a graceful stop, the counts so far become one batch per tenant with a ``flush_id``
made once; the batches are handed to the feature gate (``TenantUsageService.RecordUsage``,
many to a call), which records each ``flush_id`` once. A batch that fails keeps its
``flush_id`` and is sent again at the next flush (new counts go to new batches), so a
batch whose acknowledgement was lost never counts twice. A crash loses what was counted since the last flush.

The platform's own tenant and the isolation canaries are never metered: no one bills them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from google.protobuf import timestamp_pb2
from towerco.internal.v1 import usage_pb2, usage_pb2_grpc

from . import context, error_catalogue
from .channels import service_channel
from .errors import ErrorReason
from .identity import ServiceIdentity

log = logging.getLogger("towerco.usage")

READ_CALLS = "read_calls"
WRITE_CALLS = "write_calls"
RATE_LIMITED = "rate_limited"
PLAN_REFUSED = "plan_refused"
#: Refused over the tenant's ``call_concurrency`` (too many calls in flight in one process).
CALLS_LIMITED = "calls_limited"
DB_MICROSECONDS = "db_microseconds"
#: ``feature:<name>``: calls of an RPC whose policy names that gated feature.
FEATURE_PREFIX = "feature:"
#: The counters every tenant may have, besides one ``feature:<name>`` per gated feature.
COUNTERS = (READ_CALLS, WRITE_CALLS, RATE_LIMITED, PLAN_REFUSED, DB_MICROSECONDS, CALLS_LIMITED)
#: Which refusals are counted, and as what. A call refused so did not use its feature.
REFUSALS: dict[str, str] = {
    error_catalogue.name(ErrorReason.RATE_LIMITED): RATE_LIMITED,
    error_catalogue.name(ErrorReason.FEATURE_NOT_IN_PLAN): PLAN_REFUSED,
    error_catalogue.name(ErrorReason.FEATURE_WITHHELD_BY_OVERRIDE): PLAN_REFUSED,
    error_catalogue.name(ErrorReason.QUOTA_EXCEEDED): PLAN_REFUSED,
    error_catalogue.name(ErrorReason.TENANT_CALLS_LIMIT): CALLS_LIMITED,
}
#: Tenants whose use no one is billed for.
NOT_METERED = frozenset({context.PLATFORM_TENANT, *context.CANARY_TENANTS})
HOUR = 3600

#: Most batches one RecordUsage call carries.
BATCHES_PER_CALL = 500

#: Sends batches; returns once the feature gate recorded them all, with the flush ids it had
#: recorded before (repeats), and raises otherwise.
Sink = Callable[[usage_pb2.RecordUsageRequest], Awaitable[list[str]]]


def calls_counter(rate_class: str) -> str:
    """The counter a call of ``rate_class`` (``read`` or ``write``) adds to."""
    return READ_CALLS if rate_class == "read" else WRITE_CALLS


def counters_of(rate_class: str, feature: str) -> tuple[str, str | None]:
    """What a call of a method counts: its class's calls counter, and its gated feature's if any."""
    return calls_counter(rate_class), FEATURE_PREFIX + feature if feature else None


@dataclass
class Batch:
    """One tenant's counts handed over at once; ``flush_id`` stays the same until acknowledged."""

    tenant_id: str
    counts: dict[tuple[int, str], int]
    flush_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    attempts: int = 0

    def message(self) -> usage_pb2.UsageBatch:
        return usage_pb2.UsageBatch(
            tenant_id=self.tenant_id,
            flush_id=self.flush_id,
            counts=[
                usage_pb2.UsageCount(hour=timestamp_pb2.Timestamp(seconds=hour), counter=counter, value=value)
                for (hour, counter), value in sorted(self.counts.items())
            ],
        )


class UsageMeter:
    """A process's usage counters and their flushes."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._counts: dict[tuple[str, int, str], int] = {}
        #: Batches made and not yet acknowledged, oldest first.
        self.pending: list[Batch] = []
        self._sink: Sink | None = None
        self._task: asyncio.Task[None] | None = None

    # --- counting: no await, no I/O ---------------------------------------------------------

    def count(self, tenant_id: str, counter: str, n: int = 1) -> None:
        """Add ``n`` to the tenant's ``counter`` in the current hour."""
        if tenant_id in NOT_METERED:
            return
        key = (tenant_id, int(self._clock()) // HOUR * HOUR, counter)
        counts = self._counts
        counts[key] = counts.get(key, 0) + n

    def call(self, tenant_id: str, calls: str, feature: str | None, refused_as: str | None) -> None:
        """One call of the tenant's user: its class's calls; the refusal (``REFUSALS``) or the feature used."""
        if tenant_id in NOT_METERED:
            return
        hour = int(self._clock()) // HOUR * HOUR
        counts = self._counts
        key = (tenant_id, hour, calls)
        counts[key] = counts.get(key, 0) + 1
        counter = refused_as or feature
        if counter is not None:
            key = (tenant_id, hour, counter)
            counts[key] = counts.get(key, 0) + 1

    def db_time(self, tenant_id: str, seconds: float) -> None:
        """Time one of the tenant's database transactions held, counted only on its own users' calls.

        The platform's work for a tenant (recording its usage, registering it, an admin's
        change) is not the tenant's use; counting the usage records' own writes would also
        make every flush the cause of the next.
        """
        if context.tenant_user_call() == tenant_id:
            self.count(tenant_id, DB_MICROSECONDS, round(seconds * 1_000_000))

    # --- flushing -----------------------------------------------------------------------------

    def cut(self) -> list[Batch]:
        """Turn the counts so far into one new batch per tenant, after those still unacknowledged."""
        counts, self._counts = self._counts, {}
        by_tenant: dict[str, dict[tuple[int, str], int]] = {}
        for (tenant_id, hour, counter), value in counts.items():
            by_tenant.setdefault(tenant_id, {})[(hour, counter)] = value
        self.pending.extend(Batch(tenant_id, tenant_counts) for tenant_id, tenant_counts in by_tenant.items())
        return self.pending

    async def flush(self, sink: Sink, concurrency: int = 4) -> int:
        """Send every batch (the new counts cut first), ``BATCHES_PER_CALL`` to a call; the
        acknowledged ones are dropped. Returns how many batches failed."""
        batches = list(self.cut())
        calls = [batches[i : i + BATCHES_PER_CALL] for i in range(0, len(batches), BATCHES_PER_CALL)]
        slots = asyncio.Semaphore(concurrency)

        async def send(part: list[Batch]) -> bool:
            async with slots:
                for batch in part:
                    batch.attempts += 1
                try:
                    repeated = await sink(usage_pb2.RecordUsageRequest(batches=[batch.message() for batch in part]))
                except Exception as exc:  # kept, with their flush ids, for the next flush
                    log.warning(
                        "usage of %d tenants not recorded yet (attempt %d): %s; kept for the next flush",
                        len(part), max(batch.attempts for batch in part), exc,
                    )  # fmt: skip
                    return False
                for flush_id in repeated:
                    log.info("usage flush %s was recorded before: counted once", flush_id)
                return True

        done = await asyncio.gather(*(send(part) for part in calls))
        sent = {id(batch) for part, ok in zip(calls, done, strict=True) if ok for batch in part}
        self.pending = [batch for batch in self.pending if id(batch) not in sent]
        return len(batches) - len(sent)

    def start(self, sink: Sink, interval: float) -> None:
        """Flush to ``sink`` every ``interval`` seconds, in the background, until :meth:`close`."""
        self._sink = sink
        self._task = asyncio.create_task(self._every(sink, interval), name="usage-flush")

    async def _every(self, sink: Sink, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush(sink)
            except Exception:  # never let one bad flush end the flushing
                log.exception("usage flush failed; its batches are kept")

    async def close(self, attempts: int = 3, pause: float = 0.2) -> None:
        """Stop the background flushes, then flush what is left (a graceful stop loses nothing).

        A batch that fails is tried again, ``attempts`` times in all: there is no next
        flush to leave it to.
        """
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._sink is None:
            return
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(pause * attempt)
            if not await self.flush(self._sink):
                return
        lost = sum(sum(batch.counts.values()) for batch in self.pending)
        log.error("usage of %d tenant batches (%d counts) not recorded before stopping", len(self.pending), lost)


class RemoteUsageSink:
    """Sends batches to the feature gate's ``RecordUsage``, as this service (never a caller)."""

    def __init__(self, target: str, identity: ServiceIdentity, timeout: float = 5.0) -> None:
        self._channel = service_channel(target, identity=identity)
        self._stub = usage_pb2_grpc.TenantUsageServiceStub(self._channel)
        self._timeout = timeout

    async def __call__(self, request: usage_pb2.RecordUsageRequest) -> list[str]:
        reply: usage_pb2.RecordUsageResponse = await self._stub.RecordUsage(request, timeout=self._timeout)
        return list(reply.repeated_flush_ids)

    async def close(self) -> None:
        await self._channel.close(None)


_meter = UsageMeter()


def active() -> UsageMeter:
    """The process's meter."""
    return _meter
