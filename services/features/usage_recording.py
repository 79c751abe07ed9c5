"""towerco.internal.v1.TenantUsageService: the usage every service process counted, recorded once.

A batch is one tenant's counts with a ``flush_id`` (``services/runtime/usage.py``). Each is
applied in its own transaction bound to its tenant: the ``flush_id`` goes into
``usage_flushes`` first; if it was there already the batch is a retry whose
acknowledgement was lost, and nothing is added. Otherwise its counts are added to
``usage_hourly``. The feature gate's own counts take the same path without the network
(:func:`local_sink`).
"""

from __future__ import annotations

import contextlib
import datetime
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from grpc import aio
from towerco.internal.v1 import usage_pb2, usage_pb2_grpc

from services.runtime import context, usage
from services.runtime.db import Database
from services.runtime.errors import ErrorReason, unavailable
from services.runtime.faults import Faults, InjectedFaultError
from services.runtime.ids import TENANT_ID
from services.runtime.plans import FEATURE_PATTERN
from services.runtime.server import Runtime
from services.runtime.validation import Violations

Ctx = aio.ServicerContext[Any, Any]

#: Returns a row when the flush is new; none when it was recorded before.
RECORD_FLUSH = """
INSERT INTO features.usage_flushes (tenant_id, flush_id) VALUES ($1, $2)
ON CONFLICT (tenant_id, flush_id) DO NOTHING
RETURNING flush_id
"""

ADD_USAGE = """
INSERT INTO features.usage_hourly (tenant_id, hour, counter, value)
SELECT $1, t.hour, t.counter, t.value
FROM unnest($2::timestamptz[], $3::text[], $4::bigint[]) AS t (hour, counter, value)
ON CONFLICT (tenant_id, hour, counter) DO UPDATE SET value = usage_hourly.value + EXCLUDED.value
"""

#: Tests: the batches are committed and the acknowledgement is lost.
AFTER_COMMIT = "usage.record.after_commit"

#: The hours a Timestamp can name: 0001-01-01T00:00Z to 9999-12-31T23:00Z.
FIRST, LAST = -62_135_596_800, 253_402_297_200
COUNTER_RULE = f"must be one of {', '.join(usage.COUNTERS)} or {usage.FEATURE_PREFIX}<feature>"

#: Binds one batch's tenant for its transaction (the door differs by who sends it).
Scope = Callable[[str], contextlib.AbstractContextManager[Any]]


@dataclass(frozen=True)
class CheckedBatch:
    tenant_id: str
    flush_id: uuid.UUID
    #: Summed by (hour, counter), so the upsert meets each row once.
    counts: dict[tuple[datetime.datetime, str], int]


class TenantUsageServicer(usage_pb2_grpc.TenantUsageServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._db = runtime.db
        self._faults = runtime.faults

    async def RecordUsage(self, request: usage_pb2.RecordUsageRequest, ctx: Ctx) -> usage_pb2.RecordUsageResponse:
        batches = checked(request)
        repeated = await record(self._db, self._faults, batches, _for_the_calling_service)
        return usage_pb2.RecordUsageResponse(repeated_flush_ids=repeated)


def _for_the_calling_service(tenant_id: str) -> contextlib.AbstractContextManager[Any]:
    return context.platform_scope(tenant_id, "features.record_usage")


def _as_own_bookkeeping(tenant_id: str) -> contextlib.AbstractContextManager[Any]:
    return context.system_scope(tenant_id, "features.record_own_usage")


def checked(request: usage_pb2.RecordUsageRequest) -> list[CheckedBatch]:
    """The request's batches, checked whole; INVALID_ARGUMENT naming each bad field."""
    v = Violations()
    if len(request.batches) > usage.BATCHES_PER_CALL:
        v.add("batches", f"at most {usage.BATCHES_PER_CALL} batches to a call")
    seen: set[uuid.UUID] = set()
    out: list[CheckedBatch] = []
    for i, batch in enumerate(request.batches):
        where = f"batches[{i}]"
        v.identifier(f"{where}.tenant_id", batch.tenant_id, TENANT_ID)
        flush_id = _uuid(batch.flush_id)
        if flush_id is None:
            v.add(f"{where}.flush_id", "must be a UUID, made once per batch and kept across its retries")
        elif flush_id in seen:
            v.add(f"{where}.flush_id", "is another batch's of this request: one flush_id per batch")
        else:
            seen.add(flush_id)
        counts: dict[tuple[datetime.datetime, str], int] = {}
        for j, count in enumerate(batch.counts):
            field = f"{where}.counts[{j}]"
            hour = count.hour.seconds
            if not count.HasField("hour") or hour % usage.HOUR or count.hour.nanos or not FIRST <= hour <= LAST:
                v.add(f"{field}.hour", "must be the start of a UTC hour, years 1 to 9999")
            if not _known(count.counter):
                v.add(f"{field}.counter", COUNTER_RULE)
            if count.value < 0:
                v.add(f"{field}.value", "must be zero or more")
            key = (count.hour.ToDatetime(tzinfo=datetime.UTC), count.counter)
            counts[key] = counts.get(key, 0) + count.value
        out.append(CheckedBatch(batch.tenant_id, flush_id or uuid.UUID(int=0), counts))
    v.raise_if_any()
    return out


def _uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def _known(counter: str) -> bool:
    if counter in usage.COUNTERS:
        return True
    feature = counter.removeprefix(usage.FEATURE_PREFIX)
    return feature != counter and FEATURE_PATTERN.fullmatch(feature) is not None


async def record(db: Database, faults: Faults, batches: list[CheckedBatch], scope: Scope) -> list[str]:
    """Record each batch in its tenant's own transaction; the flush ids that were recorded before."""
    repeated: list[str] = []
    for batch in batches:
        with scope(batch.tenant_id):
            async with db.transaction() as conn:
                new = await conn.fetchval(RECORD_FLUSH, batch.tenant_id, batch.flush_id)
                if new is not None and batch.counts:
                    hours, counters = zip(*batch.counts, strict=True)
                    await conn.execute(
                        ADD_USAGE, batch.tenant_id, list(hours), list(counters), list(batch.counts.values())
                    )
        if new is None:
            repeated.append(str(batch.flush_id))
    try:
        faults.check(AFTER_COMMIT)
    except InjectedFaultError as exc:
        raise unavailable(
            f"{len(batches)} usage batches were recorded but not acknowledged ({exc}); "
            "send them again with the same flush ids",
            ErrorReason.SERVICE_UNAVAILABLE,
            1.0,
        ) from None
    return repeated


def local_sink(db: Database, faults: Faults) -> usage.Sink:
    """The feature gate's own counts, recorded in its database directly: its bookkeeping, not a call."""

    async def send(request: usage_pb2.RecordUsageRequest) -> list[str]:
        return await record(db, faults, checked(request), _as_own_bookkeeping)

    return send
