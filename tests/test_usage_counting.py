"""Usage metering's counting: what a tenant's users did, counted on the call and flushed exactly.

The stack tests run a scripted mix of calls and read ``features.usage_hourly`` as the
database's administrator: the counts there must equal what the client saw, call for call,
across two sites processes, a graceful restart of one of them, and a flush whose
acknowledgement is lost. The unit tests hold the meter's batches to their flush ids.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import timestamp_pb2
from towerco.features.v1 import feature_gate_service_pb2 as features_pb
from towerco.features.v1 import feature_gate_service_pb2_grpc as features_grpc
from towerco.internal.v1 import usage_pb2, usage_pb2_grpc
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc

from services.runtime import usage
from services.runtime.usage import UsageMeter

from .support import bearer, expect_error, expect_refusal, rich_error
from .support.requests import set_limit

#: The refusals the client may see in the script, and the counter each one adds to.
REFUSED_AS = {"RATE_LIMITED": "rate_limited", "FEATURE_NOT_IN_PLAN": "plan_refused", "QUOTA_EXCEEDED": "plan_refused"}
ANALYTICS = "feature:advanced_analytics"


class Script:
    """Makes calls as one tenant's user and tallies, from what the client saw, what must be counted."""

    def __init__(self, md: Any) -> None:
        self.md = md
        self.expected: collections.Counter[str] = collections.Counter()

    def call(self, method: Any, request: Any, calls: str, feature: str | None = None) -> str:
        """The call's outcome: "" when it succeeded, else its ErrorInfo reason (one of REFUSED_AS)."""
        self.expected[calls] += 1
        try:
            method(request, metadata=self.md, timeout=10)
        except grpc.RpcError as exc:
            reason = rich_error(exc).reason
            assert reason in REFUSED_AS, rich_error(exc)
            self.expected[REFUSED_AS[reason]] += 1
            return reason
        if feature is not None:
            self.expected[feature] += 1
        return ""

    def reads(self, stub: Any, n: int) -> None:
        for _ in range(n):
            assert self.call(stub.ListSites, pb.ListSitesRequest(page_size=1), "read_calls") == ""

    def create(self, stub: Any, site_id: str) -> str:
        request = pb.CreateSiteRequest(site_id=site_id, site=pb.Site(name=f"Site {site_id}"))
        return self.call(stub.CreateSite, request, "write_calls")

    def analytics(self, stub: Any) -> str:
        return self.call(stub.GetSiteAnalytics, pb.GetSiteAnalyticsRequest(), "read_calls", ANALYTICS)


def query(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """Rows of ``sql`` as the database's administrator (RLS does not hold it)."""

    async def fetch() -> list[asyncpg.Record]:
        conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(fetch())


def recorded(dsn: str, tenant_id: str) -> dict[str, int]:
    """The tenant's usage as recorded, summed over hours."""
    rows = query(
        dsn,
        "SELECT counter, sum(value)::bigint AS value FROM features.usage_hourly WHERE tenant_id = $1 GROUP BY counter",
        tenant_id,
    )
    return {r["counter"]: r["value"] for r in rows}


def calls_recorded(dsn: str, tenant_id: str) -> dict[str, int]:
    """The tenant's recorded usage but its database time (which the client cannot tally)."""
    return {k: v for k, v in recorded(dsn, tenant_id).items() if k != usage.DB_MICROSECONDS}


def _equal(found: dict[str, int], expected: collections.Counter[str]) -> None:
    assert found == dict(expected), f"recorded {found}, the client saw {dict(expected)}"


def stop_gracefully(process: Any) -> None:
    """SIGTERM, as a deployment stops a pod, and wait for the process to finish."""
    process.terminate()
    assert process.wait(30) == 0


def test_a_mix_of_calls_across_two_sites_processes_and_a_restart_is_counted_exactly(
    sites, extra_sites, features, new_tenant, token, platform_token, admin_dsn, eventually
):
    tenant, bystander = new_tenant(plan="basic"), new_tenant(plan="basic")
    x, y = Script(bearer(token(tenant))), Script(bearer(token(bystander)))
    # The second process flushes only when it stops: what it counted reaches the records
    # only through the flush of a graceful stop.
    only_on_stop = {"USAGE_FLUSH_SECONDS": "3600"}
    first = extra_sites(only_on_stop)
    with grpc.insecure_channel(first.target) as channel:
        other = sites_grpc.SiteServiceStub(channel)
        x.reads(sites, 3)
        x.reads(other, 2)
        assert x.create(sites, "U-1") == x.create(other, "U-2") == ""
        assert x.analytics(other) == "FEATURE_NOT_IN_PLAN"  # basic has no advanced analytics
        y.reads(sites, 2)
    stop_gracefully(first.process)

    second = extra_sites(only_on_stop)
    with grpc.insecure_channel(second.target) as channel:
        other = sites_grpc.SiteServiceStub(channel)
        set_limit(features, platform_token, tenant, "max_sites", 2)
        # Until the new limit is heard of, a create may still succeed: the script counts what happened.
        for _ in range(100):
            if x.create(other, f"U-{uuid.uuid4().hex[:6]}") == "QUOTA_EXCEEDED":
                break
            time.sleep(0.05)
        features.SetFeatureOverride(
            features_pb.SetFeatureOverrideRequest(tenant_id=tenant, feature="advanced_analytics", enabled=True),
            metadata=bearer(platform_token),
            timeout=10,
        )
        for _ in range(100):  # refused until the override is heard of; each refusal counted
            if x.analytics(sites) == "":
                break
            time.sleep(0.05)
        set_limit(features, platform_token, tenant, "rpm_read", 6)
        for _ in range(200):
            if x.call(other.ListSites, pb.ListSitesRequest(page_size=1), "read_calls") == "RATE_LIMITED":
                break
            time.sleep(0.05)
    stop_gracefully(second.process)

    assert x.expected["rate_limited"] >= 1 and x.expected["plan_refused"] >= 2 and x.expected[ANALYTICS] == 1
    eventually(lambda: _equal(calls_recorded(admin_dsn, tenant), x.expected), within=15)
    assert recorded(admin_dsn, tenant)[usage.DB_MICROSECONDS] > 0  # its calls' transactions
    # The bystander's usage is its own two reads (and their database time), nothing of the tenant's.
    assert calls_recorded(admin_dsn, bystander) == y.expected == {"read_calls": 2}


def test_a_flush_recorded_but_not_acknowledged_is_sent_again_and_counted_once(
    extra_service, new_tenant, token, admin_dsn
):
    gate = extra_service("features", {"FAULT_POINTS": "usage.record.after_commit:1"})
    # It flushes once, as it stops: one batch, whose first attempt is recorded and not acknowledged.
    sender = extra_service("sites", {"FEATURES_TARGET": gate.target, "USAGE_FLUSH_SECONDS": "3600"})
    tenant = new_tenant(plan="basic")
    script = Script(bearer(token(tenant)))
    with grpc.insecure_channel(sender.target) as channel:
        script.reads(sites_grpc.SiteServiceStub(channel), 3)
    stop_gracefully(sender.process)
    assert "recorded but not acknowledged" in sender.output()
    assert "was recorded before: counted once" in sender.output()  # the retry, known by its flush id
    assert calls_recorded(admin_dsn, tenant) == script.expected == {"read_calls": 3}
    flushes = query(admin_dsn, "SELECT flush_id FROM features.usage_flushes WHERE tenant_id = $1", tenant)
    assert len(flushes) == 1


def test_the_feature_gates_own_calls_are_counted(features_target, new_tenant, token, admin_dsn, eventually):
    tenant = new_tenant(plan="basic")
    script = Script(bearer(token(tenant)))
    with grpc.insecure_channel(features_target) as channel:
        gate = features_grpc.FeatureGateServiceStub(channel)
        for _ in range(2):
            assert script.call(gate.GetEntitlements, features_pb.GetEntitlementsRequest(), "read_calls") == ""
    eventually(lambda: _equal(calls_recorded(admin_dsn, tenant), script.expected), within=15)


def _batch(tenant_id: str, *counts: usage_pb2.UsageCount, flush_id: str = "") -> usage_pb2.UsageBatch:
    return usage_pb2.UsageBatch(tenant_id=tenant_id, flush_id=flush_id or str(uuid.uuid4()), counts=counts)


def _request(*batches: usage_pb2.UsageBatch) -> usage_pb2.RecordUsageRequest:
    return usage_pb2.RecordUsageRequest(batches=batches)


def _count(counter: str, value: int, hour: int = 1_785_000_000 // 3600 * 3600) -> usage_pb2.UsageCount:
    return usage_pb2.UsageCount(hour=timestamp_pb2.Timestamp(seconds=hour), counter=counter, value=value)


def test_record_usage_refuses_end_user_tokens(features_target, tenant_pair, token, platform_token, admin_dsn):
    tenant, _ = tenant_pair
    with grpc.insecure_channel(features_target) as channel:
        stub = usage_pb2_grpc.TenantUsageServiceStub(channel)
        for md in (bearer(platform_token), bearer(token(tenant))):
            expect_refusal(
                stub.RecordUsage,
                _request(_batch(tenant, _count("read_calls", 1000))),
                md,
                grpc.StatusCode.PERMISSION_DENIED,
                "SERVICE_IDENTITY_REQUIRED",
                "towerco.internal.v1.TenantUsageService",
            )
    assert recorded(admin_dsn, tenant) == {}


def test_record_usage_names_each_bad_field_and_records_nothing(features_target, tenant_pair, service_token, admin_dsn):
    tenant, other = tenant_pair
    twice = str(uuid.uuid4())
    bad = _request(
        _batch(other, _count("read_calls", 1), flush_id=twice),  # good, but not recorded: the request is refused
        _batch(
            tenant,
            _count("read_calls", 1),
            _count("read_calls", 1, hour=1_785_000_000 // 3600 * 3600 + 60),
            _count("calls", 1),
            _count("feature:Not-A-Feature", 1),
            _count("write_calls", -1),
            flush_id="not-a-uuid",
        ),
        _batch("Not A Tenant", flush_id=twice),
    )
    md = bearer(service_token("sites"))
    with grpc.insecure_channel(features_target) as channel:
        stub = usage_pb2_grpc.TenantUsageServiceStub(channel)
        error = expect_error(stub.RecordUsage, bad, metadata=md)
        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"), error
        assert error.fields == [
            "batches[1].flush_id",
            "batches[1].counts[1].hour",
            "batches[1].counts[2].counter",
            "batches[1].counts[3].counter",
            "batches[1].counts[4].value",
            "batches[2].tenant_id",
            "batches[2].flush_id",
        ]
        assert recorded(admin_dsn, tenant) == recorded(admin_dsn, other) == {}
        # Good batches sent twice (the acknowledgement lost) are recorded once.
        first = _batch(tenant, _count("read_calls", 2), _count("feature:advanced_analytics", 1))
        second = _batch(other, _count("write_calls", 1))
        replies = [stub.RecordUsage(_request(first, second), metadata=md, timeout=10) for _ in range(2)]
    assert [list(r.repeated_flush_ids) for r in replies] == [[], [first.flush_id, second.flush_id]]
    assert recorded(admin_dsn, tenant) == {"read_calls": 2, "feature:advanced_analytics": 1}
    assert recorded(admin_dsn, other) == {"write_calls": 1}


# --- The meter on its own (no server) ------------------------------------------------------------


class Sink:
    """Records the batches of each call; fails the next ``failures`` calls after receiving them."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls: list[list[usage_pb2.UsageBatch]] = []

    async def __call__(self, request: usage_pb2.RecordUsageRequest) -> list[str]:
        self.calls.append(list(request.batches))
        if self.failures:
            self.failures -= 1
            raise ConnectionError("acknowledgement lost")
        return []


def totals(batches: list[usage_pb2.UsageBatch]) -> dict[tuple[str, str], int]:
    out: collections.Counter[tuple[str, str]] = collections.Counter()
    for batch in batches:
        for count in batch.counts:
            out[(batch.tenant_id, count.counter)] += count.value
    return dict(out)


def meter_at(clock: list[float]) -> UsageMeter:
    return UsageMeter(clock=lambda: clock[0])


async def test_a_failed_batch_keeps_its_flush_id_and_new_counts_go_to_a_new_batch() -> None:
    meter, sink = UsageMeter(), Sink(failures=1)
    meter.call("t_one", usage.READ_CALLS, None, None)
    assert await meter.flush(sink) == 1
    meter.call("t_one", usage.WRITE_CALLS, None, None)
    assert await meter.flush(sink) == 0
    [first], [again, new] = sink.calls
    assert again.flush_id == first.flush_id and again.counts == first.counts
    assert new.flush_id != first.flush_id
    assert [c.counter for c in new.counts] == [usage.WRITE_CALLS]
    assert meter.pending == []


async def test_counts_are_batched_per_tenant_and_by_utc_hour() -> None:
    clock = [7 * 3600 + 3599.5]
    meter, sink = meter_at(clock), Sink()
    meter.call("t_one", usage.READ_CALLS, usage.FEATURE_PREFIX + "advanced_analytics", None)
    clock[0] += 1  # the next hour
    meter.call("t_one", usage.READ_CALLS, None, usage.RATE_LIMITED)
    meter.call("t_two", usage.WRITE_CALLS, None, usage.PLAN_REFUSED)
    await meter.flush(sink)
    [batches] = sink.calls  # one call
    by_tenant = {b.tenant_id: b for b in batches}
    assert sorted(by_tenant) == ["t_one", "t_two"]
    assert {(c.hour.seconds, c.counter, c.value) for c in by_tenant["t_one"].counts} == {
        (7 * 3600, "read_calls", 1),
        (7 * 3600, "feature:advanced_analytics", 1),
        (8 * 3600, "read_calls", 1),
        (8 * 3600, "rate_limited", 1),
    }
    assert totals([by_tenant["t_two"]]) == {("t_two", "write_calls"): 1, ("t_two", "plan_refused"): 1}


@pytest.mark.parametrize("tenant_id", ["platform", "canary_a", "canary_b"])
async def test_the_platform_and_the_canaries_are_not_metered(tenant_id: str) -> None:
    meter, sink = UsageMeter(), Sink()
    meter.call(tenant_id, usage.READ_CALLS, None, None)
    meter.count(tenant_id, usage.DB_MICROSECONDS, 10)
    await meter.flush(sink)
    assert sink.calls == []


async def test_closing_flushes_what_is_left_once() -> None:
    meter, sink = UsageMeter(), Sink()
    meter.start(sink, interval=3600)
    meter.call("t_one", usage.READ_CALLS, None, None)
    await meter.close()
    assert totals(sink.calls[0]) == {("t_one", "read_calls"): 1}
    await meter.close()  # a second close sends nothing more
    assert len(sink.calls) == 1


async def test_many_tenants_go_in_calls_of_at_most_the_limit_each() -> None:
    meter, sink = UsageMeter(), Sink()
    tenants = [f"t_{i:04d}" for i in range(usage.BATCHES_PER_CALL * 2 + 1)]
    for tenant_id in tenants:
        meter.call(tenant_id, usage.READ_CALLS, None, None)
    await meter.flush(sink)
    assert sorted(len(call) for call in sink.calls) == [1, usage.BATCHES_PER_CALL, usage.BATCHES_PER_CALL]
    assert sorted(b.tenant_id for call in sink.calls for b in call) == tenants
