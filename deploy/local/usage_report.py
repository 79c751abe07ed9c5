"""``make usage-report MONTH=2026-11``: one CSV row per tenant with its month's usage, for billing.

It asks the feature gate's ``ListTenantUsage`` as a platform admin, page by page, so its
totals are the API's by construction; the report adds nothing of its own but the month
column and leaves out the platform's own tenant (the API already leaves out the
isolation canaries). The month is a calendar month in UTC: ``[first day 00:00, next
month's first day 00:00)``.

In dev it mints a platform admin token from the dev keys and calls the dev stack's feature
gate (``FEATURES_PORT``, default 50053); elsewhere pass ``--target`` and ``--token``.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from google.protobuf import timestamp_pb2
from towerco.features.v1 import feature_gate_service_pb2 as pb

from services.runtime import usage
from services.runtime.context import CANARY_TENANTS, PLATFORM_TENANT

_MONTH = re.compile(r"(\d{4})-(0[1-9]|1[0-2])")
#: Columns before the features': the month, who, on which plan, then the counters.
COUNTERS = usage.COUNTERS
#: Rows the report leaves out: not anyone's bill.
NOT_BILLED = frozenset({PLATFORM_TENANT, *CANARY_TENANTS})
#: The most a month's page holds (the feature gate caps pages by tenant-hours).
PAGE_SIZE = 100


class MonthError(ValueError):
    """``--month`` is not ``YYYY-MM``."""


def month_window(month: str) -> tuple[datetime, datetime]:
    """``2026-11`` -> [2026-11-01T00:00Z, 2026-12-01T00:00Z)."""
    found = _MONTH.fullmatch(month)
    if found is None:
        raise MonthError(f"--month must be YYYY-MM, e.g. 2026-11, not {month!r}")
    year, number = int(found[1]), int(found[2])
    start = datetime(year, number, 1, tzinfo=UTC)
    end = datetime(year + number // 12, number % 12 + 1, 1, tzinfo=UTC)
    return start, end


def tenant_usage(stub: Any, token: str, start: datetime, end: datetime) -> Iterator[pb.TenantUsage]:
    """Every tenant ListTenantUsage lists for the window, all pages."""
    request = pb.ListTenantUsageRequest(start_time=_stamp(start), end_time=_stamp(end), page_size=PAGE_SIZE)
    while True:
        reply = stub.ListTenantUsage(request, metadata=(("authorization", f"Bearer {token}"),), timeout=30)
        yield from reply.tenants
        if not reply.next_page_token:
            return
        request.page_token = reply.next_page_token


def write_report(out: TextIO, month: str, tenants: Sequence[pb.TenantUsage]) -> int:
    """The CSV of ``tenants`` (billed ones only) for ``month``; how many rows it wrote."""
    billed = [t for t in tenants if t.tenant_id not in NOT_BILLED]
    features = sorted({name for t in billed for name in t.totals.feature_calls})
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["month", "tenant_id", "plan", *COUNTERS, *(f"feature:{name}" for name in features)])
    for t in billed:
        counts = [getattr(t.totals, name) for name in COUNTERS]
        writer.writerow([month, t.tenant_id, t.plan, *counts, *(t.totals.feature_calls.get(n, 0) for n in features)])
    return len(billed)


def run(stub: Any, token: str, month: str, out: TextIO) -> int:
    start, end = month_window(month)
    return write_report(out, month, list(tenant_usage(stub, token, start, end)))


def _stamp(when: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp
