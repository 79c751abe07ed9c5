"""GetUsage, ListTenantUsage and CheckLimit: what tenants used, from the platform's own records.

Metered usage (calls, refusals, database time, gated features) is read from the
feature gate's hourly records, which every service flushes to (``0002_usage.sql``).
Held usage (sites, users) is counted by the service that owns it when asked
(``services/runtime/held_resources.py``): never the caller's claim.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from datetime import datetime
from typing import Any

from google.protobuf import timestamp_pb2
from towerco.features.v1 import feature_gate_service_pb2 as pb

from services.runtime import cells, context, usage
from services.runtime.db import Database
from services.runtime.entitlements import EntitlementDirectory, Entitlements
from services.runtime.held_resources import OWNERS, HeldResourceCounts
from services.runtime.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, PageTokens, page_size
from services.runtime.plans import LIMITS, UNLIMITED
from services.runtime.scope import require_platform_admin

from . import queries
from .usage_window import Window

#: The counters of ``usage_hourly`` that are fields of UsageCounts; ``feature:<name>`` go to its map.
PLAIN_COUNTERS = usage.COUNTERS
FEATURE_PREFIX = usage.FEATURE_PREFIX
#: Never listed: the isolation canaries' sentinel rows are not usage.
UNLISTED = tuple(context.CANARY_TENANTS)
#: How many tenant-hours one page of ListTenantUsage sums at most: 100 tenants of a 31-day
#: month. A page's time grows with tenants x hours; this keeps it well within the
#: statement timeout whatever the window (a year: 8 tenants a page).
TENANT_HOURS_PER_PAGE = 100 * 31 * 24


def page_cap(window: Window) -> int:
    """The most tenants one page of ``window`` may hold (AIP-158: a larger page_size is capped)."""
    hours = int((window.end - window.start).total_seconds()) // 3600
    return max(1, min(MAX_PAGE_SIZE, TENANT_HOURS_PER_PAGE // hours))


def add_count(counts: pb.UsageCounts, counter: str, value: int) -> None:
    if counter in PLAIN_COUNTERS:
        setattr(counts, counter, getattr(counts, counter) + value)
    elif counter.startswith(FEATURE_PREFIX):
        name = counter[len(FEATURE_PREFIX) :]
        counts.feature_calls[name] = counts.feature_calls.get(name, 0) + value


class UsageReports:
    def __init__(
        self, db: Database, entitlements: EntitlementDirectory, held: HeldResourceCounts, tokens: PageTokens
    ) -> None:
        self._db = db
        self._entitlements = entitlements
        self._held = held
        self._tokens = tokens

    async def usage(self, tenant_id: str, window: Window, found: Entitlements | None) -> pb.Usage:
        """``found``: the tenant's entitlements now, or None once it is deleted (nothing held, no limits)."""
        with _bound(tenant_id, "read usage"):
            async with self._db.transaction(readonly=True) as conn:
                rows = await conn.fetch(queries.USAGE_BY_HOUR, tenant_id, window.start, window.end)
        reply = pb.Usage(tenant_id=tenant_id, start_time=_stamp(window.start), end_time=_stamp(window.end))
        for row in rows:
            if not reply.hours or reply.hours[-1].hour_start_time != _stamp(row["hour"]):
                reply.hours.add(hour_start_time=_stamp(row["hour"]))
            add_count(reply.hours[-1].counts, row["counter"], row["value"])
            add_count(reply.totals, row["counter"], row["value"])
        if found is not None:
            reply.plan = found.plan
            held = await self._held.count(tenant_id, LIMITS)
            for resource in LIMITS:
                item = reply.limits.add(resource=resource, limit=found.limit(resource))
                if resource in held:
                    item.used = held[resource]
        else:
            record = await self._entitlements.record(tenant_id)
            reply.plan = record.plan if record else ""
        return reply

    async def tenant_usage(self, window: Window, requested_size: int, page_token: str) -> pb.ListTenantUsageResponse:
        """Every tenant's totals: the platform's own read across tenants, platform admins only."""
        caller = require_platform_admin()
        cap = page_cap(window)
        size = page_size(requested_size, default=min(DEFAULT_PAGE_SIZE, cap), maximum=cap)
        position = self._tokens.decode(page_token, caller.tenant_id, window.query())
        after = str(position.get("after", "")) if position else ""
        # Each cell's first page after the position: the first tenants of all are among them.
        # A cell that cannot be reached fails the call (UNAVAILABLE): a report missing tenants would pass for whole.
        rows = []
        for cell in self._db.cells:
            with cells.on_cell(cell):
                async with self._db.platform_read("list tenant usage") as conn:
                    rows += await conn.fetch(
                        queries.USAGE_TOTALS_PAGE, window.start, window.end, after, list(UNLISTED), size + 1
                    )
        totals: dict[str, pb.UsageCounts] = {}
        for row in rows:
            add_count(totals.setdefault(row["tenant_id"], pb.UsageCounts()), row["counter"], row["value"])
        tenants = sorted(totals)
        reply = pb.ListTenantUsageResponse()
        for tenant_id in tenants[:size]:
            record = await self._entitlements.record(tenant_id)
            reply.tenants.add(tenant_id=tenant_id, plan=record.plan if record else "", totals=totals[tenant_id])
        if len(tenants) > size:
            reply.next_page_token = self._tokens.encode(caller.tenant_id, window.query(), {"after": tenants[size - 1]})
        return reply

    async def check_limit(self, found: Entitlements, resource: str) -> pb.CheckLimitResponse:
        limit = found.limit(resource)
        if resource in OWNERS:
            usage = (await self._held.count(found.tenant_id, (resource,)))[resource]
            return pb.CheckLimitResponse(allowed=limit == UNLIMITED or usage < limit, limit=limit, usage=usage)
        # A rate or a concurrency: held per call by the rate limiter or the bulkhead.
        return pb.CheckLimitResponse(allowed=limit != 0, limit=limit, usage=0)


def _bound(tenant_id: str, purpose: str) -> AbstractContextManager[Any]:
    """The call's own tenant as it is bound; another one (a platform admin's read) through the platform path."""
    return nullcontext() if tenant_id == context.current_tenant() else context.platform_scope(tenant_id, purpose)


def _stamp(when: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp
