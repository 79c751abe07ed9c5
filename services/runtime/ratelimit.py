"""Per-tenant request rates, decided in Redis so the limit holds across every process.

One Lua script per decision, GCRA (the generic cell rate algorithm): a tenant's
``rpm_read`` or ``rpm_write`` becomes one request every ``60/rpm`` seconds, and a tenant
that has been quiet may send up to ``burst_seconds`` worth of requests at once. The
script reads the Redis server's clock (``TIME``), so processes with skewed clocks still
agree, and stores one key per tenant and class, ``ratelimit:{<tenant_id>}:<class>``,
hash-tagged by tenant so Redis Cluster keeps a tenant's keys in one slot.

Redis is asked with a short timeout (``REDIS_TIMEOUT_SECONDS``, tens of milliseconds).
When it fails, a circuit breaker stops asking it for a second and this process decides
alone: by default it admits a local share of the tenant's rate (``RATE_LIMIT_LOCAL_SHARE``,
fail open), or refuses everything when ``RATE_LIMIT_FAIL_CLOSED`` is set. Every such
decision is counted and the count is logged when Redis answers again.

Fewer round trips (``rate_holdings.py``): a refusal's wait is remembered, and the tenant's
calls of that class are refused in this process without asking Redis until it is over (the
*box*); and for a tenant whose rate is high, one script call takes a *lease* of ``k``
calls (GCRA advanced by ``k`` intervals at once, or by as many as fit), which this process
spends locally. ``k`` covers ``lease_seconds`` of the tenant's rate (1, today's one call
per decision, below ``120 / lease_seconds`` calls per minute), at most
:data:`~.rate_holdings.LEASE_MOST`. Every call a lease admits was counted in Redis first,
so the limit still holds across processes: over any window a tenant is admitted at most
``k`` calls per process more than GCRA alone would (calls leased before the window and
spent in it), and a lease left unspent lapses after ``lease_ttl_seconds``, its calls lost
to the tenant, not lent to anyone. One refill per tenant and class is in flight at a time.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass

from redis.exceptions import RedisError

from . import metrics
from .rate_holdings import Holdings, lease_size
from .redis_clients import CommandClient, RedisBusyError, RedisConfig, command_client

log = logging.getLogger("towerco.ratelimit")

# KEYS[1]: the tenant's key for one class. ARGV[1]: emission interval (µs per request).
# ARGV[2]: burst tolerance (µs). ARGV[3]: how many calls to admit at most (the lease).
# Returns {n, 0} when n >= 1 calls are admitted (as many as fit, up to ARGV[3]), {0, µs to
# wait} when none is. With ARGV[3] = 1 this is one GCRA decision.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat - tolerance
if now < allow_at then
  return {0, math.ceil(allow_at - now)}
end
local n = math.min(tonumber(ARGV[3]), math.floor((now - allow_at) / interval) + 1)
local new_tat = tat + n * interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {n, 0}
"""

UNLIMITED = -1


def rate_key(tenant_id: str, rate_class: str) -> str:
    return f"ratelimit:{{{tenant_id}}}:{rate_class}"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    #: How long to wait before the next call can be admitted (0 when admitted).
    retry_after_seconds: float = 0.0
    #: True when Redis could not be asked and this process decided alone.
    local: bool = False
    #: True when refused only because Redis is away and the limiter fails closed.
    unavailable: bool = False


ADMIT = Decision(True)


@dataclass(frozen=True)
class LimiterConfig:
    burst_seconds: float = 10.0
    breaker_seconds: float = 1.0
    #: The share of a tenant's rate one process admits on its own while Redis is down.
    local_share: float = 0.25
    fail_closed: bool = False
    #: A lease covers this many seconds of a tenant's rate (0: one call per Redis decision).
    lease_seconds: float = 0.02
    #: An unspent lease lapses after this long.
    lease_ttl_seconds: float = 0.2


def _gcra_params(per_minute: int, burst_seconds: float) -> tuple[float, float]:
    interval = 60_000_000 / per_minute  # µs between two requests at the steady rate
    return interval, max(0.0, burst_seconds * 1_000_000 - interval)


class _LocalGcra:
    """The same algorithm in this process's memory: the fallback while Redis is away."""

    def __init__(self) -> None:
        self._tat: dict[str, float] = {}

    def decide(self, key: str, per_minute: int, burst_seconds: float) -> Decision:
        interval, tolerance = _gcra_params(per_minute, burst_seconds)
        now = time.monotonic() * 1_000_000
        tat = max(self._tat.get(key, now), now)
        if now < tat - tolerance:
            return Decision(False, (tat - tolerance - now) / 1_000_000, local=True)
        self._tat[key] = tat + interval
        if len(self._tat) > 100_000:  # bounded: forget the idle ones
            self._tat = {k: v for k, v in self._tat.items() if v > now}
        return Decision(True, local=True)


class RateLimiter:
    def __init__(self, redis: RedisConfig, config: LimiterConfig) -> None:
        self._config = config
        self._redis: CommandClient = command_client(redis, "ratelimit")
        self._script = self._redis.register_script(_GCRA)
        self._local = _LocalGcra()
        self._held = Holdings(config.lease_ttl_seconds)
        #: Per rate key, set when the lease being fetched for it has arrived (or not).
        self._refills: dict[str, asyncio.Event] = {}
        self._down_until = 0.0
        #: Decisions made without Redis, by outcome ("admitted", "refused").
        self.local_decisions: Counter[str] = Counter()
        #: How decisions were made: ``asked`` Redis, ``leased`` (spent a lease), ``boxed``.
        self.counts: Counter[str] = Counter()
        self._local_since_log = 0

    async def decide(self, tenant_id: str, rate_class: str, per_minute: int) -> Decision:
        """Admit one ``rate_class`` call of the tenant, or say how long to wait."""
        if per_minute == UNLIMITED:
            return ADMIT
        if per_minute == 0:
            return Decision(False, 60.0)
        key = rate_key(tenant_id, rate_class)
        while True:
            now = time.monotonic()
            wait = self._held.boxed(key, per_minute, now)
            if wait is not None:
                self.counts["boxed"] += 1
                return Decision(False, wait)
            if self._held.take(key, per_minute, now):
                self.counts["leased"] += 1
                return ADMIT
            refill = self._refills.get(key)
            if refill is None:
                break
            await refill.wait()  # another call is fetching a lease for this key: share it
        if now < self._down_until:
            return self._decide_locally(key, per_minute)
        calls = lease_size(per_minute, self._config.lease_seconds)
        if calls == 1:
            return await self._ask(key, per_minute, 1)
        self._refills[key] = refill = asyncio.Event()
        try:
            return await self._ask(key, per_minute, calls)
        finally:
            del self._refills[key]
            refill.set()

    def standing(self, tenant_id: str, rate_class: str) -> tuple[float, int] | None:
        """The wait left in the tenant's box for ``rate_class`` and the rate it was boxed at, or
        None when this process is not refusing it: memory only, never Redis."""
        standing = self._held.standing(rate_key(tenant_id, rate_class), time.monotonic())
        if standing is not None:
            self.counts["boxed"] += 1
        return standing

    async def _ask(self, key: str, per_minute: int, calls: int) -> Decision:
        """One script call: admit up to ``calls`` calls, lease what this one does not spend."""
        interval, tolerance = _gcra_params(per_minute, self._config.burst_seconds)
        sent_at = time.monotonic()
        try:
            granted, wait_us = await self._script(keys=[key], args=[f"{interval:.0f}", f"{tolerance:.0f}", calls])
        except (RedisError, OSError) as exc:
            self._trip(exc)
            return self._decide_locally(key, per_minute)
        self._recovered()
        self.counts["asked"] += 1
        if int(granted) > 0:
            if int(granted) > 1:
                self._held.lease(key, per_minute, time.monotonic(), int(granted) - 1)
            return ADMIT
        wait = int(wait_us) / 1_000_000
        self._held.box(key, per_minute, sent_at, wait)
        return Decision(False, wait)

    def _decide_locally(self, key: str, per_minute: int) -> Decision:
        if self._config.fail_closed:
            decision = Decision(False, self._config.breaker_seconds, local=True, unavailable=True)
        else:
            share = max(1, math.floor(per_minute * self._config.local_share))
            decision = self._local.decide(key, share, self._config.burst_seconds)
            if not decision.allowed and decision.retry_after_seconds > 60 / per_minute:
                # The share is this process's stopgap, not the tenant's rate: the wait told is
                # never longer than one interval of that rate, since Redis may answer again by
                # then (and a gateway's penalty box holds the tenant for what it is told).
                decision = Decision(False, 60 / per_minute, local=True)
        self.local_decisions["admitted" if decision.allowed else "refused"] += 1
        self._local_since_log += 1
        return decision

    def _trip(self, exc: BaseException) -> None:
        if isinstance(exc, RedisBusyError):
            return  # every connection busy: this call decided alone, the next ones still ask Redis
        if self._down_until == 0.0:
            mode = "refusing calls" if self._config.fail_closed else f"admitting {self._config.local_share:.0%} locally"
            log.warning("rate limiter: Redis unavailable (%s); %s", exc, mode)
        self._down_until = time.monotonic() + self._config.breaker_seconds
        metrics.active().dependency_error("redis")
        metrics.active().breaker("redis", "rate_limiter", is_open=True)

    def _recovered(self) -> None:
        if self._down_until != 0.0:
            log.warning(
                "rate limiter: Redis answers again after %d local decisions (totals: %s)",
                self._local_since_log,
                dict(self.local_decisions),
            )
            self._down_until = 0.0
            self._local_since_log = 0
            metrics.active().breaker("redis", "rate_limiter", is_open=False)

    async def close(self) -> None:
        await self._redis.aclose()


async def measure(redis: RedisConfig, decisions: int = 2000) -> dict[str, float]:
    """What a decision costs here against ``redis`` (µs per decision), and how many decisions
    one Redis call makes: admitted one per call (no lease, as for small plans) and with
    leases (a rate high enough for the largest lease), refused by Redis and from the box.
    For benchmarks; tenants ``measure_*`` are used, keys expire on their own."""
    figures: dict[str, float] = {}
    per_minute, stamp = 10**9, time.time_ns()
    for name, lease_seconds in (("admitted", 0.0), ("admitted_leased", LimiterConfig.lease_seconds)):
        limiter = RateLimiter(redis, LimiterConfig(lease_seconds=lease_seconds))
        try:
            tenant = f"measure_{name}_{stamp}"
            await limiter.decide(tenant, "read", per_minute)  # loads the script, connects
            limiter.counts.clear()
            started = time.perf_counter()
            for _ in range(decisions):
                await limiter.decide(tenant, "read", per_minute)
            figures[f"{name}_us"] = (time.perf_counter() - started) / decisions * 1e6
            figures[f"{name}_per_redis_call"] = decisions / max(1, limiter.counts["asked"])
        finally:
            await limiter.close()
    limiter = RateLimiter(redis, LimiterConfig())
    try:
        tenant = f"measure_refused_{stamp}"
        await limiter.decide(tenant, "read", 1)  # the one call a minute: the rest are refused
        key = rate_key(tenant, "read")
        started = time.perf_counter()
        for _ in range(decisions):
            await limiter._ask(key, 1, 1)  # what every refusal cost before the box: one script call
        figures["refused_redis_us"] = (time.perf_counter() - started) / decisions * 1e6
        started = time.perf_counter()
        for _ in range(decisions):
            await limiter.decide(tenant, "read", 1)
        figures["refused_boxed_us"] = (time.perf_counter() - started) / decisions * 1e6
    finally:
        await limiter.close()
    return figures
