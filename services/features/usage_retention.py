"""Usage records are kept for a period, then deleted on their own (README "Data lifecycle").

Two tables, two periods, one task each on the shared purge (``services/runtime/idempotency_purge.py``:
tenants found in one platform read, then each tenant's old rows ``BATCH_ROWS`` per short
transaction bound to that tenant, an INFO line per tenant, ``towerco_retention_purged_rows_total``):

- ``features.usage_hourly``: hours older than ``USAGE_RETENTION_DAYS`` (760, about 25 months:
  billing's period). Usage outlives the tenant: a deleted tenant's rows go by age like any other.
- ``features.usage_flushes``: flush ids older than ``USAGE_FLUSH_RECORD_DAYS`` (7). A flush id is
  only needed while the batch it names may still arrive again, and a batch is retried only by the
  live process that made it, every ``USAGE_FLUSH_SECONDS`` until acknowledged (a crashed process's
  batch is lost, not retried by another): days exceed any such retry by far.
"""

from __future__ import annotations

import dataclasses

from services.runtime.idempotency_purge import IdempotencyPurge, aged_rows
from services.runtime.server import Runtime

DAY_SECONDS = 86400.0

USAGE_HOURLY = aged_rows("features.usage_hourly", "hour", what="usage records", purpose="usage.retention")
# usage_flushes has no platform_read policy (tests/test_tenant_doors.py keeps it so): the tenants
# that may hold old flush ids are those with usage hours as old, since each flush adds to an hour
# no later than its arrival and usage is kept longer than flush ids (both defaults, and the README).
USAGE_FLUSHES = dataclasses.replace(
    aged_rows("features.usage_flushes", "received_time", what="usage flush records", purpose="usage.retention"),
    tenants_sql="SELECT DISTINCT tenant_id FROM features.usage_hourly WHERE hour < now() - make_interval(secs => $1)",
)


def start_usage_retention(runtime: Runtime) -> None:
    """Runs both purges in ``runtime``'s process, started and stopped with it."""
    settings = runtime.settings
    interval = settings.retention_purge_interval_seconds
    purges = (
        IdempotencyPurge(runtime.db, USAGE_HOURLY, settings.usage_retention_days * DAY_SECONDS, interval),
        IdempotencyPurge(runtime.db, USAGE_FLUSHES, settings.usage_flush_record_days * DAY_SECONDS, interval),
    )
    runtime.on_start(*(purge.start for purge in purges))
    runtime.on_stop(*(purge.close for purge in purges))
