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
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass

from redis.exceptions import RedisError

from . import metrics
from .redis_clients import CommandClient, RedisBusyError, RedisConfig, command_client

log = logging.getLogger("towerco.ratelimit")

# KEYS[1]: the tenant's key for one class. ARGV[1]: emission interval (µs per request).
# ARGV[2]: burst tolerance (µs). Returns {1, 0} when admitted, {0, µs to wait} when not.
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
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, 0}
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
        self._down_until = 0.0
        #: Decisions made without Redis, by outcome ("admitted", "refused").
        self.local_decisions: Counter[str] = Counter()
        self._local_since_log = 0

    async def decide(self, tenant_id: str, rate_class: str, per_minute: int) -> Decision:
        """Admit one ``rate_class`` call of the tenant, or say how long to wait."""
        if per_minute == UNLIMITED:
            return ADMIT
        if per_minute == 0:
            return Decision(False, 60.0)
        key = rate_key(tenant_id, rate_class)
        if time.monotonic() >= self._down_until:
            interval, tolerance = _gcra_params(per_minute, self._config.burst_seconds)
            try:
                allowed, wait_us = await self._script(keys=[key], args=[f"{interval:.0f}", f"{tolerance:.0f}"])
            except (RedisError, OSError) as exc:
                self._trip(exc)
            else:
                self._recovered()
                return ADMIT if allowed else Decision(False, int(wait_us) / 1_000_000)
        return self._decide_locally(key, per_minute)

    def _decide_locally(self, key: str, per_minute: int) -> Decision:
        if self._config.fail_closed:
            decision = Decision(False, self._config.breaker_seconds, local=True, unavailable=True)
        else:
            share = max(1, math.floor(per_minute * self._config.local_share))
            decision = self._local.decide(key, share, self._config.burst_seconds)
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
