"""Per-tenant configuration cached in memory and in Redis, changes pushed at once.

A read looks in this process's memory, then in Redis (one key per tenant and kind,
``tenant:{<tenant_id>}:<kind>``, hash-tagged so one tenant's keys share a Redis Cluster
slot, kept for an hour), then asks the source of truth (the registry's database, or the
registry itself). Every value carries the tenant's ``version``, which grows with each
change, and a cache never replaces a newer value by an older one, so a slow reader can
never put back what a change just replaced.

The writer of a change stores the new value in Redis and publishes
``<tenant_id> <version>`` on its cache's channel (one per writer of versions: the
registry's tenant records, the feature gate's entitlements); every process drops what it holds that is
older, so a change is seen everywhere within milliseconds, not after an hour. Without
Redis every read falls back to the source, each process trusts its memory for
``tenant_cache_seconds`` at most, and requests are still served.

However Redis behaves, a change is never lost behind a stale copy:

- the writer keeps a change it could not store and announce (Redis down, hung, or its
  connection dead) and retries it, backing off, until both land;
- a process trusts a value from Redis only once it has checked that tenant and kind
  against the source since it last (re)subscribed: while it was not listening, Redis may
  have missed a change (its writer gone before it could retry, writes lost in a crash)
  and this process may have missed its announcement. A reader that finds Redis behind the
  source repairs it and announces the newer version, as the writer would have.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from . import metrics
from .redis_clients import CommandClient, RedisBusyError, RedisConfig, command_client, subscriber_client

log = logging.getLogger("towerco.cache")

CHANNEL = "towerco:tenant-changed"
REDIS_TTL_SECONDS = 3600
#: Backoff of the writer's retries of changes Redis has not taken yet.
RESEND_FIRST_SECONDS = 0.1
RESEND_MAX_SECONDS = 5.0
#: Pause before subscribing again after the subscription broke.
RESUBSCRIBE_SECONDS = 0.5

# Store `version|json` unless Redis already holds the same or a newer version.
_SET_IF_NEWER = """
local current = redis.call('GET', KEYS[1])
if current then
  local version = tonumber(string.match(current, '^(%d+)|'))
  if version and version >= tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2], 'EX', ARGV[3])
return 1
"""


def redis_key(tenant_id: str, kind: str) -> str:
    return f"tenant:{{{tenant_id}}}:{kind}"


@dataclass(frozen=True)
class Versioned:
    """A cached value and the tenant version it was read at (0: the tenant does not exist)."""

    version: int
    value: dict[str, Any] | None


Loader = Callable[[], Awaitable[Versioned]]
#: One tenant's changed values by kind, as a change publishes them.
Change = Mapping[str, Versioned]


@dataclass
class _Entry:
    item: Versioned
    stored_at: float


def _newest(older: Change, newer: Change) -> dict[str, Versioned]:
    """Both changes' values, the newer version of each kind."""
    merged = dict(older)
    for kind, item in newer.items():
        if kind not in merged or merged[kind].version < item.version:
            merged[kind] = item
    return merged


class TenantCache:
    """Memory → Redis → source, with versioned fills and pushed invalidation."""

    def __init__(
        self,
        redis: RedisConfig,
        *,
        local_seconds: float,
        breaker_seconds: float = 1.0,
        channel: str = CHANNEL,
    ) -> None:
        #: Versions are counted per channel: one writer's versions never mix with another's.
        self._channel = channel
        purpose = channel.removeprefix("towerco:").removesuffix("-changed")  # tenant, entitlements
        self._redis: CommandClient = command_client(redis, f"{purpose}-cache")
        self._subscriber: aioredis.Redis = subscriber_client(redis, f"{purpose}-subscriber")
        self._set_if_newer = self._redis.register_script(_SET_IF_NEWER)
        self._local: dict[tuple[str, str], _Entry] = {}
        #: The newest version announced per tenant: older values are never kept.
        self._floor: dict[str, int] = {}
        #: What Redis holds is trusted for these (tenant, kind) only: checked against the
        #: source since the subscription (``_epoch``) began.
        self._verified: set[tuple[str, str]] = set()
        self._epoch = 0
        #: Changes Redis has not stored and announced yet, per tenant, retried until it has.
        self._unsent: dict[str, Change] = {}
        self._unsent_added = asyncio.Event()
        #: Whether a change has failed to land since Redis last took them all (logged once).
        self._outage = False
        #: What could not be done at once: ``deferred`` and ``resent`` changes, ``dropped``
        #: ones (unsent at shutdown), ``repaired`` Redis values (found behind the source),
        #: commands failed for want of a free connection (``busy``).
        self.counts: Counter[str] = Counter()
        self._local_seconds = local_seconds
        self._breaker_seconds = breaker_seconds
        self._redis_down_until = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._listening = asyncio.Event()

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name=f"{self._channel} listener"),
            asyncio.create_task(self._resend(), name=f"{self._channel} resender"),
        ]

    async def wait_listening(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), seconds)
        return self._listening.is_set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._unsent:
            self.counts["dropped"] += len(self._unsent)
            log.warning(
                "stopping with changes of %d tenant(s) never stored in Redis (%s); readers check Redis against "
                "the source after it comes back",
                len(self._unsent),
                ", ".join(sorted(self._unsent)[:10]),
            )
        await self._redis.aclose()
        await self._subscriber.aclose()

    async def get(self, tenant_id: str, kind: str, load: Loader) -> Versioned:
        """The value of ``kind`` for the tenant, from the nearest place that has it fresh."""
        key = (tenant_id, kind)
        entry = self._local.get(key)
        if entry is not None and time.monotonic() - entry.stored_at < self._local_seconds:
            metrics.active().cache_lookup(hit=True)
            return entry.item
        metrics.active().cache_lookup(hit=False)
        cached = await self._redis_get(tenant_id, kind)
        if cached is not None and cached.version < self._floor.get(tenant_id, 0):
            cached = None  # Redis missed a change this process has heard of
        elif cached is not None and key in self._verified:
            self._keep(tenant_id, kind, cached)
            return cached
        # Nothing in Redis, or nothing this process has checked since it (re)subscribed.
        epoch = self._epoch
        try:
            item = await load()
        except Exception:
            known = entry.item if entry is not None else cached
            if known is not None:
                # The source is unreachable: the last known value beats refusing every call.
                log.warning("tenant %s %s: source unreachable, serving the last known value", tenant_id, kind)
                return known
            raise
        if await self._settle(tenant_id, kind, cached, item) and epoch == self._epoch:
            self._verified.add(key)
        self._keep(tenant_id, kind, item)
        return item

    async def _settle(self, tenant_id: str, kind: str, cached: Versioned | None, item: Versioned) -> bool:
        """Make Redis hold the source's answer ``item`` or newer; whether it now does.

        A tenant the source does not know (version 0) is not stored: random ids must not fill Redis.
        """
        if item.version == 0 or (cached is not None and cached.version >= item.version):
            return True
        if not await self._redis_put(tenant_id, kind, item):
            return False
        if cached is not None:
            # Redis missed a change that its writer may no longer retry: tell every process.
            self.counts["repaired"] += 1
            log.warning("tenant %s %s: Redis held version %d of %d; repaired", tenant_id, kind,
                        cached.version, item.version)  # fmt: skip
            await self._redis_publish(tenant_id, item.version)
        return True

    def peek(self, tenant_id: str, kind: str) -> Versioned | None:
        """The last value this process knew, however old (for when nothing can be asked)."""
        entry = self._local.get((tenant_id, kind))
        return entry.item if entry is not None else None

    async def publish(self, tenant_id: str, version: int, values: dict[str, dict[str, Any] | None]) -> None:
        """After a committed change: store the new values and tell every process, now or later."""
        self._announce(tenant_id, version)
        change = {kind: Versioned(version, value) for kind, value in values.items()}
        for kind, item in change.items():
            self._keep(tenant_id, kind, item)
        # Held until Redis has it: neither a failure nor a cancelled call loses it.
        held = self._hold(tenant_id, change)
        if self._redis_usable() and await self._send(tenant_id, held):
            self._release(tenant_id, held)
        else:
            self._deferred(tenant_id)

    def _keep(self, tenant_id: str, kind: str, item: Versioned) -> None:
        if item.version < self._floor.get(tenant_id, 0):
            return  # an older read finishing after a change was announced
        self._local[(tenant_id, kind)] = _Entry(item, time.monotonic())

    def _announce(self, tenant_id: str, version: int) -> None:
        if version > self._floor.get(tenant_id, 0):
            self._floor[tenant_id] = version
        for key in [k for k, e in self._local.items() if k[0] == tenant_id and e.item.version < version]:
            self._local.pop(key, None)

    def _redis_usable(self) -> bool:
        return time.monotonic() >= self._redis_down_until

    def _trip(self, exc: BaseException) -> None:
        if isinstance(exc, RedisBusyError):
            self.counts["busy"] += 1  # this process is saturated, Redis is not down: no breaker
            return
        if self._redis_usable():
            log.warning("Redis unavailable (%s); reading tenants from the source for %.1fs", exc, self._breaker_seconds)
        self._redis_down_until = time.monotonic() + self._breaker_seconds
        metrics.active().dependency_error("redis")
        metrics.active().breaker("redis", self._channel, is_open=True)

    async def _redis_get(self, tenant_id: str, kind: str) -> Versioned | None:
        if not self._redis_usable():
            return None
        try:
            raw = await self._redis.get(redis_key(tenant_id, kind))
        except (RedisError, OSError) as exc:
            self._trip(exc)
            return None
        if self._redis_down_until:
            self._redis_down_until = 0.0  # answered again: the breaker closes
            metrics.active().breaker("redis", self._channel, is_open=False)
        if raw is None:
            return None
        data = raw.encode() if isinstance(raw, str) else raw
        version, _, body = data.partition(b"|")
        try:
            return Versioned(int(version), json.loads(body))
        except ValueError:
            return None

    async def _redis_put(self, tenant_id: str, kind: str, item: Versioned) -> bool:
        """Store ``item`` unless Redis holds the same or a newer version; False if Redis failed."""
        if not self._redis_usable():
            return False
        try:
            await self._store(tenant_id, kind, item)
        except (RedisError, OSError) as exc:
            self._trip(exc)
            return False
        return True

    async def _redis_publish(self, tenant_id: str, version: int) -> None:
        if not self._redis_usable():
            return
        try:
            await self._redis.publish(self._channel, f"{tenant_id} {version}")
        except (RedisError, OSError) as exc:
            self._trip(exc)

    async def _store(self, tenant_id: str, kind: str, item: Versioned) -> None:
        await self._set_if_newer(
            keys=[redis_key(tenant_id, kind)],
            args=[item.version, json.dumps(item.value, separators=(",", ":")), REDIS_TTL_SECONDS],
        )

    async def _send(self, tenant_id: str, change: Change) -> bool:
        """Store a change's values and announce it; False (breaker tripped) if Redis failed."""
        try:
            for kind, item in change.items():
                await self._store(tenant_id, kind, item)
            version = max(item.version for item in change.values())
            await self._redis.publish(self._channel, f"{tenant_id} {version}")
        except (RedisError, OSError) as exc:
            self._trip(exc)
            return False
        return True

    def _hold(self, tenant_id: str, change: Change) -> Change:
        """Keep a change until Redis has it (with any older one of the tenant still held)."""
        held = _newest(self._unsent.get(tenant_id, {}), change)
        self._unsent[tenant_id] = held
        self._unsent_added.set()
        return held

    def _release(self, tenant_id: str, sent: Change) -> None:
        if self._unsent.get(tenant_id) is sent:  # nothing newer was held meanwhile
            del self._unsent[tenant_id]

    def _deferred(self, tenant_id: str) -> None:
        self.counts["deferred"] += 1
        if not self._outage:
            self._outage = True
            log.warning("Redis did not take a change of tenant %s; retrying until it does", tenant_id)

    async def _resend(self) -> None:
        """Send what is held, backing off while Redis refuses it (this is the writer's probe)."""
        delay = RESEND_FIRST_SECONDS
        while True:
            await self._unsent_added.wait()
            await asyncio.sleep(delay)
            for tenant_id, change in list(self._unsent.items()):
                if not await self._send(tenant_id, change):
                    break
                self._release(tenant_id, change)
                self.counts["resent"] += 1
            if self._unsent:
                delay = min(delay * 2, RESEND_MAX_SECONDS)
                continue
            self._unsent_added.clear()
            delay = RESEND_FIRST_SECONDS
            if self._outage:
                self._outage = False
                log.warning("Redis took every deferred change (%d resent so far)", self.counts["resent"])

    def _distrust(self) -> None:
        """Changes may be missed from now on: what Redis holds must be checked again."""
        self._epoch += 1
        self._verified.clear()

    async def _listen(self) -> None:
        lost = False
        while True:
            try:
                async with self._subscriber.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self._channel)
                    # Messages may have been missed while not subscribed: forget everything.
                    self._local.clear()
                    self._distrust()
                    self._listening.set()
                    if lost:
                        log.warning("tenant change subscription %s restored", self._channel)
                        lost = False
                    async for message in pubsub.listen():
                        self._on_message(message.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._listening.clear()
                self._distrust()
                if not lost:
                    log.warning("tenant change subscription %s lost (%s); retrying", self._channel, exc)
                    lost = True
                await asyncio.sleep(RESUBSCRIBE_SECONDS)

    def _on_message(self, data: Any) -> None:
        if not isinstance(data, bytes):
            return
        tenant_id, _, version = data.decode(errors="replace").partition(" ")
        try:
            self._announce(tenant_id, int(version))
        except ValueError:
            log.warning("ignoring malformed tenant change message %r", data[:100])
