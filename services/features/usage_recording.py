"""towerco.internal.v1.TenantUsageService: the usage every service process counted, recorded once.

A batch is one tenant's counts with a ``flush_id`` (``services/runtime/usage.py``). It is
applied in one transaction bound to that tenant: the ``flush_id`` goes into
``usage_flushes`` first; if it was there already the batch is a retry whose
acknowledgement was lost, and nothing is added. Otherwise its counts are added to
``usage_hourly``. The feature gate's own counts take the same path without the network
(:func:`local_sink`).
"""

from __future__ import annotations

import datetime
import uuid
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

#: Tests: the batch is committed and its acknowledgement is lost.
AFTER_COMMIT = "usage.record.after_commit"


class TenantUsageServicer(usage_pb2_grpc.TenantUsageServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._db = runtime.db
        self._faults = runtime.faults

    async def RecordUsage(self, request: usage_pb2.RecordUsageRequest, ctx: Ctx) -> usage_pb2.RecordUsageResponse:
        counts = checked(request)
        with context.platform_scope(request.tenant_id, "features.record_usage"):
            repeated = await apply(self._db, self._faults, request.tenant_id, request.flush_id, counts)
        return usage_pb2.RecordUsageResponse(repeated=repeated)


def checked(request: usage_pb2.RecordUsageRequest) -> dict[tuple[datetime.datetime, str], int]:
    """The batch's counts summed by (hour, counter); INVALID_ARGUMENT naming each bad field."""
    v = Violations()
    v.identifier("tenant_id", request.tenant_id, TENANT_ID)
    try:
        uuid.UUID(request.flush_id)
    except ValueError:
        v.add("flush_id", "must be a UUID, made once per batch and kept across its retries")
    counts: dict[tuple[datetime.datetime, str], int] = {}
    for i, count in enumerate(request.counts):
        where = f"counts[{i}]"
        if not count.HasField("hour") or count.hour.seconds % usage.HOUR or count.hour.nanos:
            v.add(f"{where}.hour", "must be the start of a UTC hour")
        feature = count.counter.removeprefix(usage.FEATURE_PREFIX)
        known = count.counter in usage.COUNTERS or (
            count.counter.startswith(usage.FEATURE_PREFIX) and FEATURE_PATTERN.fullmatch(feature) is not None
        )
        if not known:
            v.add(f"{where}.counter", f"must be one of {', '.join(usage.COUNTERS)} or {usage.FEATURE_PREFIX}<feature>")
        if count.value < 0:
            v.add(f"{where}.value", "must be zero or more")
        key = (count.hour.ToDatetime(tzinfo=datetime.UTC), count.counter)
        counts[key] = counts.get(key, 0) + count.value
    v.raise_if_any()
    return counts


async def apply(
    db: Database, faults: Faults, tenant_id: str, flush_id: str, counts: dict[tuple[datetime.datetime, str], int]
) -> bool:
    """Record one batch in the bound tenant's transaction; True when ``flush_id`` was recorded before."""
    async with db.transaction() as conn:
        new = await conn.fetchval(RECORD_FLUSH, tenant_id, uuid.UUID(flush_id))
        if new is not None and counts:
            hours, counters = zip(*counts, strict=True)
            await conn.execute(ADD_USAGE, tenant_id, list(hours), list(counters), list(counts.values()))
    try:
        faults.check(AFTER_COMMIT)
    except InjectedFaultError as exc:
        raise unavailable(
            f"usage flush {flush_id} of tenant {tenant_id!r} was recorded but not acknowledged ({exc}); "
            "send it again with the same flush_id",
            ErrorReason.SERVICE_UNAVAILABLE,
            1.0,
        ) from None
    return new is None


def local_sink(db: Database, faults: Faults) -> usage.Sink:
    """The feature gate's own counts, recorded in its database directly: its bookkeeping, not a call."""

    async def record(request: usage_pb2.RecordUsageRequest) -> bool:
        counts = checked(request)
        with context.system_scope(request.tenant_id, "features.record_own_usage"):
            return await apply(db, faults, request.tenant_id, request.flush_id, counts)

    return record
