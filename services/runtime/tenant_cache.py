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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .redis_clients import RedisBusyError, RedisConfig, command_client, subscriber_client

log = logging.getLogger("towerco.cache")

CHANNEL = "towerco:tenant-changed"
REDIS_TTL_SECONDS = 3600

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


@dataclass
class _Entry:
    item: Versioned
    stored_at: float


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
        self._redis: aioredis.Redis = command_client(redis, f"{purpose}-cache")
        self._subscriber: aioredis.Redis = subscriber_client(redis, f"{purpose}-subscriber")
        self._set_if_newer = self._redis.register_script(_SET_IF_NEWER)
        self._local: dict[tuple[str, str], _Entry] = {}
        #: The newest version announced per tenant: older values are never kept.
        self._floor: dict[str, int] = {}
        self._local_seconds = local_seconds
        self._breaker_seconds = breaker_seconds
        self._redis_down_until = 0.0
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="tenant-cache-listener")

    async def wait_listening(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), seconds)
        return self._listening.is_set()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._redis.aclose()
        await self._subscriber.aclose()

    async def get(self, tenant_id: str, kind: str, load: Loader) -> Versioned:
        """The value of ``kind`` for the tenant, from the nearest place that has it fresh."""
        key = (tenant_id, kind)
        entry = self._local.get(key)
        now = time.monotonic()
        if entry is not None and now - entry.stored_at < self._local_seconds:
            return entry.item
        item = await self._redis_get(tenant_id, kind)
        if item is not None and item.version < self._floor.get(tenant_id, 0):
            item = None  # Redis missed a change this process has heard of: ask the source
        if item is None:
            try:
                item = await load()
            except Exception:
                if entry is not None:
                    # The source is unreachable: the last known value beats refusing every call.
                    log.warning("tenant %s %s: source unreachable, serving the last known value", tenant_id, kind)
                    return entry.item
                raise
            if item.value is not None:
                await self._redis_put(tenant_id, kind, item)
        self._keep(tenant_id, kind, item)
        return item

    def peek(self, tenant_id: str, kind: str) -> Versioned | None:
        """The last value this process knew, however old (for when nothing can be asked)."""
        entry = self._local.get((tenant_id, kind))
        return entry.item if entry is not None else None

    async def publish(self, tenant_id: str, version: int, values: dict[str, dict[str, Any] | None]) -> None:
        """After a committed change: store the new values and tell every process."""
        self._announce(tenant_id, version)
        for kind, value in values.items():
            self._keep(tenant_id, kind, Versioned(version, value))
            await self._redis_put(tenant_id, kind, Versioned(version, value))
        if self._redis_usable():
            try:
                await self._redis.publish(self._channel, f"{tenant_id} {version}")
            except (RedisError, OSError) as exc:
                self._trip(exc)

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
            return  # this process is saturated, Redis is not down: no breaker
        if self._redis_usable():
            log.warning("Redis unavailable (%s); reading tenants from the source for %.1fs", exc, self._breaker_seconds)
        self._redis_down_until = time.monotonic() + self._breaker_seconds

    async def _redis_get(self, tenant_id: str, kind: str) -> Versioned | None:
        if not self._redis_usable():
            return None
        try:
            raw = await self._redis.get(redis_key(tenant_id, kind))
        except (RedisError, OSError) as exc:
            self._trip(exc)
            return None
        if raw is None:
            return None
        data = raw.encode() if isinstance(raw, str) else raw
        version, _, body = data.partition(b"|")
        try:
            return Versioned(int(version), json.loads(body))
        except ValueError:
            return None

    async def _redis_put(self, tenant_id: str, kind: str, item: Versioned) -> None:
        if not self._redis_usable():
            return
        try:
            await self._set_if_newer(
                keys=[redis_key(tenant_id, kind)],
                args=[item.version, json.dumps(item.value, separators=(",", ":")), REDIS_TTL_SECONDS],
            )
        except (RedisError, OSError) as exc:
            self._trip(exc)

    async def _listen(self) -> None:
        while True:
            try:
                async with self._subscriber.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self._channel)
                    # Messages may have been missed while not subscribed: forget everything.
                    self._local.clear()
                    self._listening.set()
                    async for message in pubsub.listen():
                        self._on_message(message.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._listening.clear()
                log.warning("tenant change subscription lost (%s); retrying", exc)
                await asyncio.sleep(0.5)

    def _on_message(self, data: Any) -> None:
        if not isinstance(data, bytes):
            return
        tenant_id, _, version = data.decode(errors="replace").partition(" ")
        try:
            self._announce(tenant_id, int(version))
        except ValueError:
            log.warning("ignoring malformed tenant change message %r", data[:100])
