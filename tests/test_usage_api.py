"""Usage through the feature gate's API: GetUsage, ListTenantUsage, the billing export, CheckLimit
from the platform's own counts, threshold events, and usage kept after offboarding.

Metered rows are written here as the superuser, each test in a window of its own far from
now, so the tests do not wait for (or depend on) the services' flushes; the counting and
flushing themselves are proven in tests/test_usage_metering.py.
"""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import sys
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import json_format, timestamp_pb2
from towerco.audit.v1 import audit_log_service_pb2 as audit_pb
from towerco.features.v1 import feature_gate_service_pb2 as pb
from towerco.features.v1 import feature_gate_service_pb2_grpc as pb_grpc
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb

from deploy.local.usage_report import month_window
from services.features.usage_reports import page_cap
from services.features.usage_window import Window, checked_window
from services.runtime.plans import LIMITS
from services.runtime.validation import Violations

from .support import bearer, expect_error, expect_refusal, free_port
from .support.requests import create_site, get_tenant, set_limit

DOMAIN = "towerco.features.v1.FeatureGateService"
REPO = Path(__file__).resolve().parents[1]


def stamp(when: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(when)
    return out


def hour(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def record(admin_dsn: str, rows: list[tuple[str, str, str, int]]) -> None:
    """Writes (tenant, hour, counter, value) rows into features.usage_hourly as the superuser."""

    async def write() -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.executemany(
                "INSERT INTO features.usage_hourly (tenant_id, hour, counter, value) VALUES ($1, $2, $3, $4)",
                [(t, hour(h), c, v) for t, h, c, v in rows],
            )
        finally:
            await conn.close()

    asyncio.run(write())


def get_usage(features: Any, md: Any, start: str, end: str, tenant_id: str = "") -> pb.Usage:
    request = pb.GetUsageRequest(tenant_id=tenant_id, start_time=stamp(hour(start)), end_time=stamp(hour(end)))
    reply: pb.Usage = features.GetUsage(request, metadata=md, timeout=10)
    return reply


def list_all(features: Any, md: Any, start: datetime, end: datetime, page_size: int = 0) -> list[pb.TenantUsage]:
    request = pb.ListTenantUsageRequest(start_time=stamp(start), end_time=stamp(end), page_size=page_size)
    found: list[pb.TenantUsage] = []
    while True:
        reply = features.ListTenantUsage(request, metadata=md, timeout=10)
        found.extend(reply.tenants)
        if not reply.next_page_token:
            return found
        request.page_token = reply.next_page_token


# --- windows ----------------------------------------------------------------------------

START = hour("2026-11-01T00:00:00")


def _window(start: datetime | None, end: datetime | None) -> list[str]:
    v = Violations()
    window = checked_window(
        v,
        stamp(start) if start else timestamp_pb2.Timestamp(),
        stamp(end) if end else timestamp_pb2.Timestamp(),
        present=(start is not None, end is not None),
    )
    assert (window is None) == bool(v.items)
    return [f.field for f in v.items]


@pytest.mark.parametrize(
    ("start", "end", "fields"),
    [
        (START + timedelta(minutes=30), START + timedelta(hours=2), ["start_time"]),
        (START, START + timedelta(hours=1, seconds=1), ["end_time"]),
        (START, START + timedelta(hours=1, microseconds=1), ["end_time"]),
        (START, START, ["end_time"]),
        (START + timedelta(hours=2), START, ["end_time"]),
        (START, START + timedelta(days=366, hours=1), ["end_time"]),
        (None, START, ["start_time"]),
        (None, None, ["start_time", "end_time"]),
    ],
    ids=[
        "start-not-whole",
        "end-not-whole",
        "end-microseconds",
        "empty",
        "reversed",
        "over-a-year",
        "no-start",
        "none",
    ],
)
def test_a_bad_window_names_its_field(start: datetime | None, end: datetime | None, fields: list[str]) -> None:
    assert _window(start, end) == fields


@pytest.mark.parametrize("length", [timedelta(hours=1), timedelta(days=30), timedelta(days=366)])
def test_whole_hours_up_to_366_days_are_a_window(length: timedelta) -> None:
    assert _window(START, START + length) == []


def test_a_month_is_its_first_hour_to_the_next_months_first_hour() -> None:
    assert month_window("2026-11") == (hour("2026-11-01T00:00:00"), hour("2026-12-01T00:00:00"))
    assert month_window("2026-12") == (hour("2026-12-01T00:00:00"), hour("2027-01-01T00:00:00"))


@pytest.mark.parametrize(
    ("length", "cap"),
    [(timedelta(hours=1), 500), (timedelta(days=6), 500), (timedelta(days=31), 100), (timedelta(days=366), 8)],
)
def test_a_page_of_tenant_usage_sums_at_most_a_months_hundred_tenants(length: timedelta, cap: int) -> None:
    assert page_cap(Window(START, START + length)) == cap


def test_get_usage_refuses_a_window_not_in_whole_hours_naming_the_field(features, token, tenant_pair) -> None:
    request = pb.GetUsageRequest(
        start_time=stamp(START + timedelta(minutes=30)), end_time=stamp(START + timedelta(days=400))
    )
    error = expect_error(features.GetUsage, request, metadata=bearer(token(tenant_pair[0])))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"), error
    assert error.fields == ["start_time"], error


def test_list_tenant_usage_refuses_a_window_over_a_year_naming_the_field(features, platform_token) -> None:
    request = pb.ListTenantUsageRequest(start_time=stamp(START), end_time=stamp(START + timedelta(days=367)))
    error = expect_error(features.ListTenantUsage, request, metadata=bearer(platform_token))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"), error
    assert error.fields == ["end_time"], error


# --- GetUsage ---------------------------------------------------------------------------


def test_get_usage_shows_the_recorded_hours_and_their_totals(features, token, tenant_pair, admin_dsn) -> None:
    tenant_a, tenant_b = tenant_pair
    record(
        admin_dsn,
        [
            (tenant_a, "2025-01-10T08:00:00", "read_calls", 5),
            (tenant_a, "2025-01-10T08:00:00", "write_calls", 2),
            (tenant_a, "2025-01-10T08:00:00", "feature:advanced_analytics", 1),
            (tenant_a, "2025-01-10T09:00:00", "read_calls", 3),
            (tenant_a, "2025-01-10T09:00:00", "rate_limited", 4),
            (tenant_a, "2025-01-10T09:00:00", "plan_refused", 1),
            (tenant_a, "2025-01-10T09:00:00", "db_microseconds", 1500),
            (tenant_a, "2025-01-10T10:00:00", "read_calls", 100),  # the window's end: outside
            (tenant_a, "2025-01-10T07:00:00", "read_calls", 100),  # before its start: outside
            (tenant_b, "2025-01-10T08:00:00", "read_calls", 7),  # another tenant
        ],
    )
    usage = get_usage(features, bearer(token(tenant_a)), "2025-01-10T08:00:00", "2025-01-10T10:00:00")
    assert usage.tenant_id == tenant_a
    assert (usage.start_time.ToDatetime(UTC), usage.end_time.ToDatetime(UTC)) == (
        hour("2025-01-10T08:00:00"),
        hour("2025-01-10T10:00:00"),
    )
    assert usage.totals == pb.UsageCounts(
        read_calls=8, write_calls=2, rate_limited=4, plan_refused=1, db_microseconds=1500,
        feature_calls={"advanced_analytics": 1},
    )  # fmt: skip
    assert [(h.hour_start_time.ToDatetime(UTC), h.counts) for h in usage.hours] == [
        (
            hour("2025-01-10T08:00:00"),
            pb.UsageCounts(read_calls=5, write_calls=2, feature_calls={"advanced_analytics": 1}),
        ),
        (
            hour("2025-01-10T09:00:00"),
            pb.UsageCounts(read_calls=3, rate_limited=4, plan_refused=1, db_microseconds=1500),
        ),
    ]


def test_get_usage_shows_the_sites_and_users_held_against_each_limit(
    features, sites, new_tenant, token, platform_token
) -> None:
    tenant = new_tenant(plan="professional")
    md = bearer(token(tenant))
    set_limit(features, platform_token, tenant, "max_sites", 10)
    for n in range(3):
        create_site(sites, md, f"HELD-{n}")
    usage = get_usage(features, md, "2025-02-01T00:00:00", "2025-02-01T01:00:00")
    limits = {item.resource: item for item in usage.limits}
    assert [item.resource for item in usage.limits] == list(LIMITS)
    assert usage.plan == "professional"
    assert (limits["max_sites"].limit, limits["max_sites"].used) == (10, 3)
    # The registry knows the administrator CreateTenant made, and no other user yet.
    assert limits["max_users"].HasField("used") and limits["max_users"].used == 1
    for rate in ("rpm_read", "rpm_write", "db_concurrency"):
        assert not limits[rate].HasField("used"), limits[rate]
    assert usage.totals == pb.UsageCounts() and not usage.hours


def test_get_usage_shows_what_the_services_counted_and_flushed(
    features, sites, new_tenant, token, platform_token, eventually
) -> None:
    tenant = new_tenant(plan="professional")
    md = bearer(token(tenant))
    for _ in range(3):
        sites.ListSites(sites_pb.ListSitesRequest(page_size=1), metadata=md, timeout=10)
    create_site(sites, md, "FL-1")
    create_site(sites, md, "FL-2")
    sites.GetSiteAnalytics(sites_pb.GetSiteAnalyticsRequest(), metadata=md, timeout=10)
    # Read as the platform admin, whose calls are no tenant's usage; the window covers the
    # hour before and after, in case the calls straddle an hour.
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    request = pb.GetUsageRequest(
        tenant_id=tenant, start_time=stamp(now - timedelta(hours=1)), end_time=stamp(now + timedelta(hours=2))
    )

    def flushed() -> pb.Usage:
        usage: pb.Usage = features.GetUsage(request, metadata=bearer(platform_token), timeout=10)
        counted = pb.UsageCounts()
        counted.CopyFrom(usage.totals)
        counted.db_microseconds = 0  # a duration: only its presence is known in advance
        assert counted == pb.UsageCounts(read_calls=4, write_calls=2, feature_calls={"advanced_analytics": 1}), usage
        assert usage.totals.db_microseconds > 0, usage
        return usage

    usage = eventually(flushed, within=10, interval=0.2)  # USAGE_FLUSH_SECONDS is short in the test stack
    assert sum(h.counts.read_calls for h in usage.hours) == 4


def test_tenant_b_cannot_read_tenant_a_usage(features, token, tenant_pair, admin_dsn) -> None:
    tenant_a, tenant_b = tenant_pair
    record(admin_dsn, [(tenant_a, "2025-03-01T00:00:00", "read_calls", 9)])
    request = pb.GetUsageRequest(
        tenant_id=tenant_a, start_time=stamp(hour("2025-03-01T00:00:00")), end_time=stamp(hour("2025-03-01T01:00:00"))
    )
    expect_refusal(
        features.GetUsage,
        request,
        bearer(token(tenant_b)),
        grpc.StatusCode.PERMISSION_DENIED,
        "CROSS_TENANT_DENIED",
        DOMAIN,
    )


def test_a_platform_admin_reads_any_tenants_usage(features, platform_token, tenant_pair, admin_dsn) -> None:
    tenant_a, _ = tenant_pair
    record(admin_dsn, [(tenant_a, "2025-03-02T00:00:00", "write_calls", 4)])
    usage = get_usage(
        features, bearer(platform_token), "2025-03-02T00:00:00", "2025-03-02T01:00:00", tenant_id=tenant_a
    )
    assert (usage.tenant_id, usage.totals.write_calls) == (tenant_a, 4)


# --- ListTenantUsage and the billing export ---------------------------------------------


def test_a_tenant_cannot_list_tenant_usage(features, token, tenant_pair) -> None:
    request = pb.ListTenantUsageRequest(start_time=stamp(START), end_time=stamp(START + timedelta(hours=1)))
    expect_refusal(
        features.ListTenantUsage,
        request,
        bearer(token(tenant_pair[0])),
        grpc.StatusCode.PERMISSION_DENIED,
        "PLATFORM_ADMIN_REQUIRED",
        DOMAIN,
    )


def test_a_platform_admin_lists_every_tenants_totals_page_by_page(
    features, platform_token, tenant_pair, provision, admin_dsn
) -> None:
    suffix = uuid.uuid4().hex[:10]
    tenants = sorted([*tenant_pair, f"tc_{suffix}"])
    provision(tenants[-1])
    rows = [(t, "2025-04-03T05:00:00", "read_calls", n + 1) for n, t in enumerate(tenants)]
    rows += [(t, "2025-04-03T06:00:00", "feature:advanced_analytics", 2) for t in tenants]
    rows += [("canary_a", "2025-04-03T05:00:00", "read_calls", 50)]  # the canaries are never listed
    rows += [(tenants[0], "2025-04-04T00:00:00", "read_calls", 1000)]  # after the window
    record(admin_dsn, rows)
    md = bearer(platform_token)
    start, end = hour("2025-04-03T00:00:00"), hour("2025-04-04T00:00:00")
    first = features.ListTenantUsage(
        pb.ListTenantUsageRequest(start_time=stamp(start), end_time=stamp(end), page_size=2), metadata=md, timeout=10
    )
    assert [t.tenant_id for t in first.tenants] == tenants[:2] and first.next_page_token
    listed = list_all(features, md, start, end, page_size=2)
    assert [(t.tenant_id, t.plan, t.totals) for t in listed] == [
        (t, "enterprise", pb.UsageCounts(read_calls=n + 1, feature_calls={"advanced_analytics": 2}))
        for n, t in enumerate(tenants)
    ]
    # A page token is for the window it was issued for.
    other = pb.ListTenantUsageRequest(
        start_time=stamp(start), end_time=stamp(end + timedelta(hours=1)), page_size=2,
        page_token=first.next_page_token,
    )  # fmt: skip
    error = expect_error(features.ListTenantUsage, other, metadata=md)
    assert (error.code, error.reason, error.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
        ["page_token"],
    )


def test_the_usage_report_csv_totals_equal_list_tenant_usage(
    stack, features, features_target, platform_token, tenant_pair, admin_dsn, tmp_path
) -> None:
    tenant_a, tenant_b = tenant_pair
    record(
        admin_dsn,
        [
            (tenant_a, "2025-05-01T00:00:00", "read_calls", 11),  # the month's first hour
            (tenant_a, "2025-05-31T23:00:00", "write_calls", 3),  # and its last
            (tenant_a, "2025-05-12T10:00:00", "feature:advanced_analytics", 2),
            (tenant_b, "2025-05-20T10:00:00", "db_microseconds", 777),
            (tenant_b, "2025-06-01T00:00:00", "read_calls", 500),  # June
            ("platform", "2025-05-02T00:00:00", "read_calls", 40),  # the platform's own: not billed
        ],
    )
    out = tmp_path / "usage-2025-05.csv"
    subprocess.run(
        [
            sys.executable, "-m", "deploy.local", "usage-report", "--month", "2025-05", "--out", str(out),
            "--target", features_target, "--token", platform_token,
        ],
        cwd=REPO, check=True, timeout=60, capture_output=True,
    )  # fmt: skip
    with out.open(newline="") as f:
        report = list(csv.DictReader(f))
    listed = list_all(features, bearer(platform_token), hour("2025-05-01T00:00:00"), hour("2025-06-01T00:00:00"))
    billed = [t for t in listed if t.tenant_id != "platform"]
    assert {t.tenant_id for t in listed} == {tenant_a, tenant_b, "platform"}
    assert [r["tenant_id"] for r in report] == [t.tenant_id for t in billed]
    for row, tenant in zip(report, billed, strict=True):
        assert (row["month"], row["plan"]) == ("2025-05", tenant.plan)
        for counter in ("read_calls", "write_calls", "rate_limited", "plan_refused", "db_microseconds"):
            assert int(row[counter]) == getattr(tenant.totals, counter), (row, counter)
        assert int(row["feature:advanced_analytics"]) == tenant.totals.feature_calls.get("advanced_analytics", 0)
    assert [(r["read_calls"], r["write_calls"], r["db_microseconds"]) for r in report] == [
        ("11", "3", "0"),
        ("0", "0", "777"),
    ]


def test_the_usage_report_refuses_a_month_that_is_not_yyyy_mm(features_target, platform_token) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "deploy.local", "usage-report", "--month", "2025-13", "--target", features_target,
         "--token", platform_token],
        cwd=REPO, timeout=60, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and "--month must be YYYY-MM" in done.stderr, done.stderr


# --- CheckLimit and thresholds ----------------------------------------------------------


def test_check_limit_answers_from_the_sites_held_not_the_callers_claim(
    features, sites, new_tenant, token, platform_token
) -> None:
    tenant = new_tenant(plan="professional")
    md = bearer(token(tenant))
    set_limit(features, platform_token, tenant, "max_sites", 2)

    def check(claim: int) -> tuple[bool, int, int]:
        reply = features.CheckLimit(
            pb.CheckLimitRequest(resource="max_sites", current_usage=claim), metadata=md, timeout=10
        )
        return reply.allowed, reply.limit, reply.usage

    assert check(claim=5) == (True, 2, 0)  # a claim over the limit changes nothing
    create_site(sites, md, "CL-1")
    create_site(sites, md, "CL-2")
    assert check(claim=0) == (False, 2, 2)  # nor one under it
    sites.DeleteSite(sites_pb.DeleteSiteRequest(site_id="CL-1"), metadata=md, timeout=10)
    assert check(claim=0) == (True, 2, 1)


def threshold_events(admin_dsn: str, tenant: str) -> list[dict[str, Any]]:
    """The tenant's usage.threshold_reached events' details, in the sites outbox or delivered, oldest first."""

    async def read() -> list[tuple[Any, dict[str, Any]]]:
        conn = await asyncpg.connect(admin_dsn)
        try:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                outbox = await conn.fetch("SELECT event_id, event FROM sites.audit_outbox WHERE tenant_id = $1", tenant)
                logged = await conn.fetch(
                    "SELECT event_id, create_time, details FROM audit.events WHERE tenant_id = $1 AND action = $2",
                    tenant,
                    "usage.threshold_reached",
                )
        finally:
            await conn.close()
        found: dict[Any, tuple[Any, dict[str, Any]]] = {}
        for r in outbox:
            event = audit_pb.AuditEvent.FromString(r["event"])
            if event.action == "usage.threshold_reached":
                found[r["event_id"]] = (event.create_time.ToDatetime(UTC), json_format.MessageToDict(event.details))
        for r in logged:
            found[r["event_id"]] = (r["create_time"], json.loads(r["details"]))
        return sorted(found.values(), key=lambda item: item[0])

    return [details for _, details in asyncio.run(read())]


def test_crossing_80_and_100_percent_of_max_sites_is_audited_once_each_per_crossing(
    features, sites, new_tenant, token, platform_token, admin_dsn
) -> None:
    tenant = new_tenant(plan="professional")
    md = bearer(token(tenant))
    set_limit(features, platform_token, tenant, "max_sites", 5)
    for n in range(3):
        create_site(sites, md, f"TH-{n}")
    assert threshold_events(admin_dsn, tenant) == []
    create_site(sites, md, "TH-3")  # 4 of 5: 80%
    create_site(sites, md, "TH-4")  # 5 of 5: 100%
    refused = expect_error(
        sites.CreateSite, sites_pb.CreateSiteRequest(site_id="TH-5", site=sites_pb.Site(name="x")), metadata=md
    )
    assert refused.reason == "QUOTA_EXCEEDED"
    crossings = [(e["threshold_percent"], e["usage"], e["limit"]) for e in threshold_events(admin_dsn, tenant)]
    assert crossings == [(80, 4, 5), (100, 5, 5)]
    # Below 100% again and back: a new crossing of 100%, none of 80% (never left).
    sites.DeleteSite(sites_pb.DeleteSiteRequest(site_id="TH-0"), metadata=md, timeout=10)
    create_site(sites, md, "TH-6")
    events = threshold_events(admin_dsn, tenant)
    assert Counter(e["threshold_percent"] for e in events) == {80: 1, 100: 2}
    assert all(e["resource"] == "max_sites" for e in events)


# --- retention --------------------------------------------------------------------------


def test_a_deleted_tenants_usage_is_kept_and_still_listed(
    features, registry, new_tenant, platform_token, admin_dsn, eventually
) -> None:
    tenant = new_tenant(plan="basic")
    record(admin_dsn, [(tenant, "2025-07-04T12:00:00", "read_calls", 6)])
    registry.DeleteTenant(tenant_pb.DeleteTenantRequest(tenant_id=tenant), metadata=bearer(platform_token), timeout=10)

    def deleted() -> None:
        assert get_tenant(registry, platform_token, tenant).state == tenant_pb.Tenant.State.STATE_DELETED

    eventually(deleted, within=10, interval=0.1)
    md = bearer(platform_token)
    listed = list_all(features, md, hour("2025-07-04T00:00:00"), hour("2025-07-05T00:00:00"))
    assert [(t.tenant_id, t.plan, t.totals.read_calls) for t in listed] == [(tenant, "basic", 6)]
    usage = get_usage(features, md, "2025-07-04T00:00:00", "2025-07-05T00:00:00", tenant_id=tenant)
    assert (usage.totals.read_calls, usage.plan, list(usage.limits)) == (6, "basic", [])


# --- an owner that cannot be asked ----------------------------------------------------


def test_usage_is_unavailable_not_internal_when_the_sites_service_cannot_be_asked(
    extra_service, token, tenant_pair
) -> None:
    # A feature gate of the test's own whose sites service is a closed port.
    gate = extra_service("features", {"SITES_TARGET": f"127.0.0.1:{free_port()}"})
    md = bearer(token(tenant_pair[0]))
    with grpc.insecure_channel(gate.target) as channel:
        stub = pb_grpc.FeatureGateServiceStub(channel)
        for method, request in (
            (stub.CheckLimit, pb.CheckLimitRequest(resource="max_sites")),
            (stub.GetUsage, pb.GetUsageRequest(start_time=stamp(START), end_time=stamp(START + timedelta(hours=1)))),
        ):
            error = expect_refusal(method, request, md, grpc.StatusCode.UNAVAILABLE, "USAGE_UNAVAILABLE", DOMAIN)
            assert error.retry is not None, error
        # What needs no sites service still answers.
        reply = stub.CheckLimit(pb.CheckLimitRequest(resource="rpm_read"), metadata=md, timeout=10)
        assert (reply.allowed, reply.usage) == (True, 0)
