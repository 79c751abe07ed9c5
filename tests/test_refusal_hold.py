"""Held refusals: a RESOURCE_EXHAUSTED with a retry-after is answered no sooner than it must be.

Each test runs a sites process of its own (``REFUSAL_HOLD_MAX_MS`` and ``REFUSAL_HOLD_MAX_HELD``
as it needs them) for a fresh tenant whose rate is lowered by an override, so its refusals
wait far longer than the hold and are held for the whole of it. Times are bounded on the side
the hold decides (no sooner than the hold; a closed loop answered no more often than it allows),
never on how quickly a loaded machine answers.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
import urllib.request
from collections import Counter
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc

from services.runtime.audit import GATEWAY_HEADER
from services.runtime.interceptors.call_concurrency import LIMIT as CALL_CONCURRENCY
from services.runtime.settings import gateway_secret

from .support import RichError, bearer, free_port, rich_error
from .support.requests import set_limit

LIST = pb.ListSitesRequest(page_size=1)
#: asyncio's timers may fire up to its clock's resolution early.
EARLY = 0.005


def scrape(port: int, metric: str, **labels: str) -> float:
    """The sum of ``metric``'s samples with ``labels`` in the process's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(
        float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == metric and all(sample.labels.get(k) == v for k, v in labels.items())
    )


async def timed(call: Any) -> tuple[float, RichError | None, Any]:
    """Seconds ``call`` took, its rich error (None when it succeeded), and the failure's trailers."""
    started = time.monotonic()
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return time.monotonic() - started, rich_error(error), error.trailing_metadata()
    return time.monotonic() - started, None, None


async def drain(stub: Any, md: Any, deadline: float = 10.0) -> tuple[float, RichError, Any]:
    """ListSites (``deadline`` each) until the tenant's burst is spent, at most 50; the first refusal, timed."""
    for _ in range(50):
        took, error, trailers = await timed(stub.ListSites(LIST, metadata=md, timeout=deadline))
        if error is not None:
            assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            return took, error, trailers
    raise AssertionError("the tenant was never refused")


async def refused_at_once(target: str, md: Any, calls: int) -> list[float]:
    """Once the tenant's burst is spent, ``calls`` ListSites sent together: how long each took
    to be refused (RATE_LIMITED, every one), shortest first."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        await drain(stub, md)
        results = await asyncio.gather(*(timed(stub.ListSites(LIST, metadata=md, timeout=10)) for _ in range(calls)))
    for _, error, _ in results:
        assert_rate_limited(error)
    return sorted(t for t, _, _ in results)


def assert_rate_limited(error: RichError | None) -> RichError:
    assert error is not None, "the call was served, a refusal was expected"
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"), error
    assert error.retry is not None, error
    return error


async def test_a_closed_loop_of_callers_over_their_rate_gets_one_answer_per_hold_each(
    extra_sites, features, new_tenant, token, platform_token
):
    tenant = new_tenant(plan="basic")
    set_limit(features, platform_token, tenant, "rpm_read", 1)  # a refusal waits up to a minute
    metrics_port = free_port()
    extra = extra_sites({"REFUSAL_HOLD_MAX_MS": "250", "SITES_METRICS_PORT": str(metrics_port)})
    md = bearer(token(tenant))
    # Each refusal is held between half the cap and the cap (its wait is up to a minute).
    callers, seconds, shortest = 8, 2.0, 0.125
    answers: Counter[str] = Counter()

    async with grpc.aio.insecure_channel(extra.target) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        await drain(stub, md)
        before = scrape(metrics_port, "towerco_tenant_calls_total", tenant=tenant)
        timed_before = scrape(metrics_port, "towerco_tenant_call_duration_seconds_sum", tenant=tenant)
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds

        async def closed_loop() -> None:  # calls again the instant it is answered
            while loop.time() < until:
                _, error, _ = await timed(stub.ListSites(LIST, metadata=md, timeout=10))
                answers[error.reason if error else "OK"] += 1

        await asyncio.gather(*(closed_loop() for _ in range(callers)))

    # Refused in microseconds, 8 callers would get thousands of answers in 2 s; held, each
    # gets one per hold at most (and one more for the call under way when the loop ends).
    total = sum(answers.values())
    assert set(answers) == {"RATE_LIMITED"}, answers
    assert callers <= total <= callers * (seconds / shortest + 1), answers
    # The service's own count agrees: the closed loop costs it no more calls than it answered
    # (a call is counted just after its status is sent: the last ones a moment later).
    for _ in range(50):
        counted = scrape(metrics_port, "towerco_tenant_calls_total", tenant=tenant) - before
        if counted >= total:
            break
        await asyncio.sleep(0.05)
    assert counted == total, (counted, answers)
    assert scrape(metrics_port, "towerco_refusals_held_total", result="held") >= total
    # The hold is the policy's, not the service's time: the latency histogram leaves it out
    # (with it, each of these calls would weigh at least 0.125 s).
    timed_total = scrape(metrics_port, "towerco_tenant_call_duration_seconds_sum", tenant=tenant) - timed_before
    assert timed_total < total * shortest / 2, (timed_total, total)


async def test_a_held_refusal_comes_after_its_hold_and_gives_the_wait_that_remains(
    extra_sites, features, new_tenant, token, platform_token
):
    tenant = new_tenant(plan="basic")
    set_limit(features, platform_token, tenant, "rpm_read", 15)  # one call every 4 s past the burst
    extra = extra_sites({"REFUSAL_HOLD_MAX_MS": "1000"})
    md = bearer(token(tenant))

    async with grpc.aio.insecure_channel(extra.target) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        took, refusal, trailers = await drain(stub, md)
        answered = time.monotonic()
        error = assert_rate_limited(refusal)
        # Its wait is about 4 s: held between half the 1 s cap and the cap.
        assert took >= 0.5 - EARLY, f"answered after {took:.3f}s, before half its 1 s cap"

        # RetryInfo, retry-after-ms and the message all give the wait left after the hold.
        assert error.retry is not None
        wait_ms = error.retry.retry_delay.ToMilliseconds()
        assert 1 <= wait_ms < 4000 - 500, wait_ms
        assert dict(trailers)["retry-after-ms"] == str(wait_ms)
        stated = re.search(r"retry in ([0-9.]+)s", error.message)
        assert stated is not None and abs(float(stated[1]) * 1000 - wait_ms) <= 1, error.message

        # It is the true wait: half a second before it the tenant is still refused (a wait
        # left as it was before the hold would end a second after the slot), after it served.
        await asyncio.sleep(max(0.0, answered + wait_ms / 1000 - 0.5 - time.monotonic()))
        _, early, _ = await timed(stub.ListSites(LIST, metadata=md, timeout=10))
        assert early is not None, f"served 0.5 s before the end of the wait it was given ({wait_ms} ms)"
        assert_rate_limited(early)
        await asyncio.sleep(max(0.0, answered + wait_ms / 1000 + 0.05 - time.monotonic()))
        _, late, _ = await timed(stub.ListSites(LIST, metadata=md, timeout=10))
        assert late is None, f"refused after the wait it was given ({wait_ms} ms): {late}"


async def test_refusals_told_the_same_slot_are_answered_spread_out_not_at_once(
    extra_sites, features, new_tenant, token, platform_token
):
    """Held to the slot exactly, a closed loop's callers would all come back at one instant."""
    tenant = new_tenant(plan="basic")
    set_limit(features, platform_token, tenant, "rpm_read", 1)  # a wait of up to a minute
    extra = extra_sites({"REFUSAL_HOLD_MAX_MS": "2000"})
    md = bearer(token(tenant))

    took = await refused_at_once(extra.target, md, 8)
    # Each between half the cap and the cap; eight of them over a good part of that second
    # (all eight within 0.1 s of each other has a chance of about 8 in 10 million).
    assert took[0] >= 1.0 - EARLY, took
    assert took[-1] - took[0] >= 0.1, took


async def test_a_call_through_the_gateway_is_refused_at_once_and_a_forged_claim_is_still_held(
    stack, extra_sites, features, new_tenant, token, platform_token
):
    """The gateway's penalty box holds its tenants' refusals and learns their waits as they
    come: the service answers a call that proves it came through the gateway at once."""
    tenant = new_tenant(plan="basic")
    set_limit(features, platform_token, tenant, "rpm_read", 1)
    extra = extra_sites({"REFUSAL_HOLD_MAX_MS": "2000"})
    md = bearer(token(tenant))
    proved = (*md, (GATEWAY_HEADER, gateway_secret(stack.keys_dir).decode()))
    forged = (*md, (GATEWAY_HEADER, "guessed-secret"))

    async with grpc.aio.insecure_channel(extra.target) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        await drain(stub, md)
        took, error, trailers = await timed(stub.ListSites(LIST, metadata=proved, timeout=10))
        assert_rate_limited(error)
        assert took < 0.5, f"a call through the gateway was held {took:.3f}s"
        assert int(dict(trailers)["retry-after-ms"]) > 1000, "the wait as it is, for the penalty box"
        took, error, _ = await timed(stub.ListSites(LIST, metadata=forged, timeout=10))
        assert_rate_limited(error)
        assert took >= 1.0 - EARLY, f"a forged gateway claim escaped the hold ({took:.3f}s)"


async def test_a_call_whose_deadline_is_shorter_than_the_hold_gets_its_refusal_in_time(
    extra_sites, features, new_tenant, token, platform_token
):
    tenant = new_tenant(plan="basic")
    set_limit(features, platform_token, tenant, "rpm_read", 1)
    extra = extra_sites({"REFUSAL_HOLD_MAX_MS": "2000"})
    md = bearer(token(tenant))

    async with grpc.aio.insecure_channel(extra.target) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        await drain(stub, md)
        for _ in range(2):
            took, error, _ = await timed(stub.ListSites(LIST, metadata=md, timeout=0.5))
            # Held (not answered at once), and still RESOURCE_EXHAUSTED, never DEADLINE_EXCEEDED.
            assert_rate_limited(error)
            assert took >= 0.2, f"answered after {took:.3f}s: not held"


async def test_held_refusals_leave_the_tenants_calls_in_flight_free(
    extra_sites, features, new_tenant, token, platform_token
):
    tenant = new_tenant(plan="professional")
    set_limit(features, platform_token, tenant, "rpm_write", 1)  # writes refused, reads within the rate
    set_limit(features, platform_token, tenant, CALL_CONCURRENCY, 2)
    extra = extra_sites({"REFUSAL_HOLD_MAX_MS": "2000"})
    md = bearer(token(tenant))

    async with grpc.aio.insecure_channel(extra.target) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        await stub.CreateSite(pb.CreateSiteRequest(site_id="SLOT-0", site=pb.Site(name="s")), metadata=md, timeout=10)
        writes = []
        for n in range(1, 5):  # one after another: two at once in the chain would meet the bound itself
            create = pb.CreateSiteRequest(site_id=f"SLOT-{n}", site=pb.Site(name="s"))
            writes.append(asyncio.ensure_future(timed(stub.CreateSite(create, metadata=md, timeout=10))))
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)  # the four refusals are held now, twice the tenant's call_concurrency
        # Were they holding its slots, these would be refused TENANT_CALLS_LIMIT.
        for _ in range(3):
            await stub.ListSites(LIST, metadata=md, timeout=10)
        assert not any(write.done() for write in writes), [w.result() for w in writes if w.done()]
        for took, error, _ in await asyncio.gather(*writes):
            assert_rate_limited(error)
            assert took >= 1.0 - EARLY, took  # half the 2 s cap at least


async def test_refusals_past_the_cap_are_answered_at_once(extra_sites, features, new_tenant, token, platform_token):
    tenant = new_tenant(plan="basic")
    set_limit(features, platform_token, tenant, "rpm_read", 1)
    metrics_port = free_port()
    extra = extra_sites(
        {"REFUSAL_HOLD_MAX_MS": "2000", "REFUSAL_HOLD_MAX_HELD": "2", "SITES_METRICS_PORT": str(metrics_port)}
    )
    md = bearer(token(tenant))

    took = await refused_at_once(extra.target, md, 6)
    # Two held (half the 2 s cap at least); the four past the cap answered long before.
    assert all(t >= 1.0 - EARLY for t in took[4:]), took
    assert all(t < 0.5 for t in took[:4]), took
    assert scrape(metrics_port, "towerco_refusals_held_total", result="over_cap") == 4


async def test_held_refusals_are_answered_at_once_when_the_process_stops(
    extra_sites, features, new_tenant, token, platform_token
):
    tenant = new_tenant(plan="basic")
    set_limit(features, platform_token, tenant, "rpm_read", 1)
    extra = extra_sites({"REFUSAL_HOLD_MAX_MS": "30000", "SHUTDOWN_DELAY_SECONDS": "0"})
    md = bearer(token(tenant))

    async with grpc.aio.insecure_channel(extra.target) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        await drain(stub, md, deadline=2.0)  # its refusal held only until shortly before its deadline
        held = asyncio.ensure_future(timed(stub.ListSites(LIST, metadata=md, timeout=60)))
        await asyncio.sleep(0.5)
        assert not held.done()
        stopping = time.monotonic()
        extra.process.send_signal(signal.SIGTERM)
        _, error, _ = await held
        assert_rate_limited(error)
        assert time.monotonic() - stopping < 10, "the held refusal waited for its hold, not the shutdown"
