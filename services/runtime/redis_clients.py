"""Every Redis client a process opens, made here: bounded, named, and retried on purpose.

A *command* client (the rate limiter, each tenant cache) holds at most
``REDIS_MAX_CONNECTIONS`` connections; a burst past them waits for a free one as long as
it would wait for an answer (``REDIS_TIMEOUT_SECONDS``), then fails with
:class:`RedisBusyError`, which callers' breakers let pass: the process is busy, Redis is
not down. A command that meets a dead connection (Redis restarted, an idle connection
closed) is sent once more on a fresh one before it counts as a failure; a timed-out one
is not, since it may have run (a rate decision must not be counted twice) and the
request path must not wait twice.

A *subscriber* client holds one connection and never reconnects by itself: the cache
listening on it must see every break, because messages sent meanwhile are lost.

Connections are named ``towerco-<service>/<pid>/<purpose>`` (``CLIENT LIST``), as the
database pool names its connections.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from .settings import Settings

#: Seconds a subscriber waits to connect, and between two health checks of its connection.
SUBSCRIBER_CONNECT_SECONDS = 1.0
SUBSCRIBER_HEALTH_CHECK_SECONDS = 15


@dataclass(frozen=True)
class RedisConfig:
    """Where Redis is and how this process talks to it."""

    url: str
    #: A command gives up after this long: connecting, waiting for a pooled connection, answering.
    timeout_seconds: float = 0.05
    #: The most connections one command client opens.
    max_connections: int = 16
    #: Prefix of the connections' names in ``CLIENT LIST``.
    client_name: str = "towerco"

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisConfig:
        return cls(
            url=settings.redis_url,
            timeout_seconds=settings.redis_timeout_seconds,
            max_connections=settings.redis_max_connections,
            client_name=f"towerco-{settings.service}/{os.getpid()}",
        )


class RedisBusyError(RedisConnectionError):
    """Every connection of a pool stayed busy for the whole timeout.

    This process is saturated, not Redis down: the command fails, but no breaker should
    stop every other command for it.
    """


class _BoundedPool(aioredis.BlockingConnectionPool):
    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except RedisConnectionError as exc:
            if isinstance(exc.__cause__, TimeoutError):  # the wait for a free connection, not a connect
                raise RedisBusyError(f"all {self.max_connections} connections stayed busy for {self.timeout}s") from exc
            raise


def command_client(config: RedisConfig, purpose: str) -> aioredis.Redis:
    """A client for short commands: at most ``max_connections``, a dead connection retried once."""
    pool = _BoundedPool.from_url(
        config.url,
        max_connections=config.max_connections,
        timeout=config.timeout_seconds,
        socket_timeout=config.timeout_seconds,
        socket_connect_timeout=config.timeout_seconds,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        client_name=f"{config.client_name}/{purpose}",
    )
    return aioredis.Redis.from_pool(pool)


def subscriber_client(config: RedisConfig, purpose: str) -> aioredis.Redis:
    """A client for one subscription: one connection, no read timeout, no silent reconnect."""
    pool = aioredis.BlockingConnectionPool.from_url(
        config.url,
        max_connections=1,
        timeout=SUBSCRIBER_CONNECT_SECONDS,
        socket_connect_timeout=max(config.timeout_seconds, SUBSCRIBER_CONNECT_SECONDS),
        health_check_interval=SUBSCRIBER_HEALTH_CHECK_SECONDS,
        retry=Retry(NoBackoff(), 0),
        client_name=f"{config.client_name}/{purpose}",
    )
    return aioredis.Redis.from_pool(pool)
