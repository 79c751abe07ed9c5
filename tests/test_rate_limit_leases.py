"""Fewer Redis round trips per rate decision, against a real Redis: boxes and leases.

A *box* remembers a refusal's wait and refuses the tenant's calls of that class without
Redis until it is over; a *lease* takes several calls' worth of a high-rate tenant's
budget in one script call. Each test has its own Redis (``private_redis``), so Redis's
own command counts (``INFO commandstats``) are the limiters' alone.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import redis
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc

from services.runtime.ratelimit import Decision, LimiterConfig, RateLimiter, rate_key
from services.runtime.redis_clients import RedisConfig

from .support import bearer, rich_error
from .support.requests import set_limit


def script_calls(url: str) -> int:
    """How many scripts Redis has run (every rate decision that reached it is one EVALSHA,
    once the script is loaded: see :func:`warm`)."""
    with redis.Redis.from_url(url) as client:
        stats: dict[str, Any] = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval"))


def limiter(url: str, **config: Any) -> RateLimiter:
    return RateLimiter(RedisConfig(url, timeout_seconds=1.0), LimiterConfig(**config))


async def warm(one: RateLimiter) -> None:
    """The first decision loads the script (an EVALSHA refused NOSCRIPT, then SCRIPT LOAD)."""
    await one.decide("t_warm", "write", 60)


async def test_a_refusal_is_boxed_and_refused_without_redis_until_its_wait_is_over(private_redis):
    one = limiter(private_redis.url)
    try:
        assert (await one.decide("t_box", "read", 1)).allowed  # one a minute: no burst left after it
        first = await one.decide("t_box", "read", 1)
        assert not first.allowed and 59 < first.retry_after_seconds <= 60, first
        private_redis.stop()
        # Redis is gone; asked, it would fail and the local share (1 a minute here) would
        # admit the next call. The box refuses it as Redis did, with the wait that remains.
        boxed = [await one.decide("t_box", "read", 1) for _ in range(5)]
        assert all(not d.allowed and not d.local and not d.unavailable for d in boxed), boxed
        waits = [d.retry_after_seconds for d in boxed]
        assert waits == sorted(waits, reverse=True) and 0 < waits[-1] <= first.retry_after_seconds, waits
        assert one.counts["boxed"] == 5 and one.counts["asked"] == 2, one.counts
        # Writes are boxed apart, and a changed rate (a plan change) is not boxed: both ask
        # Redis, which is away, so the process decides alone.
        assert (await one.decide("t_box", "write", 1)).local
        assert (await one.decide("t_box", "read", 2)).local
    finally:
        await one.close()


async def test_a_boxed_tenant_is_admitted_again_once_the_wait_is_over(private_redis):
    one = limiter(private_redis.url, burst_seconds=0.0)
    try:
        assert (await one.decide("t_back", "read", 600)).allowed  # one call every 0.1 s, no burst
        refused = await one.decide("t_back", "read", 600)
        assert not refused.allowed and 0 < refused.retry_after_seconds <= 0.1, refused
        await asyncio.sleep(refused.retry_after_seconds)
        # The box never outlasts Redis's own wait: the next call goes to Redis and is admitted.
        assert (await one.decide("t_back", "read", 600)) == Decision(True)
    finally:
        await one.close()


async def test_a_high_rate_is_decided_with_leases_fewer_round_trips_same_limit(private_redis):
    """Two limiters (two processes) for one tenant at 1,000 calls a second: 20-call leases."""
    per_minute, interval_us, k = 60_000, 1000, 20
    limiters = [limiter(private_redis.url, burst_seconds=2.0) for _ in range(2)]
    key = rate_key("t_lease", "read")
    with redis.Redis.from_url(private_redis.url) as client:
        try:
            # Inside the burst every script call admits a lease of k calls.
            await warm(limiters[0])
            before = script_calls(private_redis.url)
            admitted = sum([(await limiters[i % 2].decide("t_lease", "read", per_minute)).allowed for i in range(200)])
            asked = script_calls(private_redis.url) - before
            assert admitted == 200 and asked == 200 // k, asked

            async def until_refused(one: RateLimiter) -> None:
                while (await one.decide("t_lease", "read", per_minute)).allowed:
                    pass

            # The burst used up, both hold a box and no lease: hammer both for a second.
            await asyncio.gather(*(until_refused(one) for one in limiters))
            tat_start = int(client.get(key) or 0)
            counts = [0, 0]
            stop_at = time.monotonic() + 1.0

            async def hammer(i: int) -> None:
                while time.monotonic() < stop_at:
                    counts[i] += (await limiters[i].decide("t_lease", "read", per_minute)).allowed
                    await asyncio.sleep(0)

            await asyncio.gather(hammer(0), hammer(1))
            redis_end = client.time()
            tat_end = int(client.get(key) or 0)
        finally:
            for one in limiters:
                await one.close()
    # On Redis's clock (µs): the window opens when the tenant's next call fell due (both
    # limiters boxed, neither holding a lease) and closes at ``redis_end``. GCRA alone admits
    # ``exact`` calls in it, asked without pause; Redis counted ``granted`` of them, and
    # ``unasked`` were still due at the end, not asked for in time by this event loop.
    tolerance = 2_000_000 - interval_us
    end = redis_end[0] * 1_000_000 + redis_end[1]
    exact = (end - (tat_start - tolerance)) // interval_us + 1
    granted = (tat_end - tat_start) // interval_us
    unasked = (end - (tat_end - tolerance)) // interval_us + 1
    assert granted + unasked == exact, (granted, unasked, exact)
    # Every admitted call was counted in Redis first (no more than GCRA alone), and what
    # Redis counted and the two did not spend is at most one lease each.
    total = sum(counts)
    assert total <= granted <= total + 2 * k, (counts, granted)
    assert exact - unasked - 2 * k <= total <= exact, (counts, exact, unasked)
    assert counts[0] > 0 and counts[1] > 0, counts


async def test_a_small_rate_is_one_script_call_per_decision_as_before(private_redis):
    one = limiter(private_redis.url, burst_seconds=1.0)
    try:
        await warm(one)
        before = script_calls(private_redis.url)
        decisions = [await one.decide("t_small", "read", 1200) for _ in range(40)]
        asked = script_calls(private_redis.url) - before
    finally:
        await one.close()
    admitted = sum(d.allowed for d in decisions)
    # 20 a second, a burst of one second: 20 (and what accrues meanwhile), then refused.
    assert 20 <= admitted < 40 and one.counts["leased"] == 0, decisions
    # Every admitted call, and the first refusal, asked Redis; later refusals were boxed.
    assert asked == one.counts["asked"] - 1 and asked + one.counts["boxed"] == 40, (asked, one.counts)
    assert admitted <= asked <= admitted + 3, (admitted, asked)


def test_a_service_refuses_a_boxed_tenant_without_redis_in_the_same_shape(
    extra_sites, features, new_tenant, token, platform_token, private_redis
):
    tenant, other = new_tenant(plan="basic"), new_tenant(plan="basic")
    set_limit(features, platform_token, tenant, "rpm_read", 1)  # one a minute, no burst beyond it
    md = bearer(token(tenant))
    foreign = bearer(token(tenant), **{"x-tenant-id": other})
    extra = extra_sites({"REDIS_URL": private_redis.url})
    with grpc.insecure_channel(extra.target) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        request = pb.ListSitesRequest(page_size=1)
        stub.ListSites(request, metadata=md, timeout=10)
        refusals: list[Any] = []
        for metadata in [md, md, md, foreign, md]:
            try:
                stub.ListSites(request, metadata=metadata, timeout=10)
            except grpc.RpcError as exc:
                refusals.append(exc)
            if len(refusals) == 1:
                private_redis.stop()  # asked now, Redis would fail and the local share admit
        # Writes have their own budget, never refused: that one goes to Redis, which is away.
        stub.CreateSite(pb.CreateSiteRequest(site_id="BOX-1", site=pb.Site(name="b")), metadata=md, timeout=10)

    assert len(refusals) == 5, refusals
    first, *boxed = [rich_error(r) for r in refusals]
    for error, refusal in zip([first, *boxed], refusals, strict=True):
        assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"), error
        assert error.info is not None and dict(error.info.metadata) == {"limit": "rpm_read", "per_minute": "1"}
        assert error.message.startswith(f"tenant {tenant!r} is over its read rate of 1 calls per minute; retry in ")
        assert error.retry is not None
        trailers = dict(refusal.trailing_metadata() or ())
        assert 0 < int(trailers["retry-after-ms"]) <= 60_000
    delays = [e.retry.retry_delay.ToMilliseconds() for e in [first, *boxed] if e.retry is not None]
    assert delays == sorted(delays, reverse=True) and delays[-1] > 50_000, delays
    # The cross-tenant attempt was counted against the caller's own read rate, boxed too.
    assert "rate limiter: Redis unavailable" in extra.output()  # only the write asked Redis
