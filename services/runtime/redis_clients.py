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

A ``redis+cluster://`` URL (:mod:`.redis_url`) makes the command client a Redis Cluster
client with the same bounds: at most ``REDIS_MAX_CONNECTIONS`` commands in flight (so at
most that many connections to any one node, besides the ones it reads the slot map and
the command table on), the same wait for a free one, the same timeouts; a dead connection
(or a moved slot, a failed-over master) costs one more try after the client has re-read
the cluster's slots, a timeout none. Every key a Lua script touches carries the tenant's
hash tag (``{<tenant_id>}``), so each script runs on one slot.

The subscriber stays a plain connection to one node: a classic ``PUBLISH`` sent to any node
of a Cluster reaches every node's subscribers over the cluster bus, so any node will do.
It is the first node listed; when it cannot be reached, each resubscription tries the next.
Sharded pub/sub (``SPUBLISH``) would keep a message on one shard, which saves nothing for
one channel that every process hears.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ClusterDownError, RedisClusterException, SlotNotCoveredError
from redis.exceptions import ConnectionError as RedisConnectionError

from .redis_url import cluster_address

if TYPE_CHECKING:
    from .settings import Settings

#: What :func:`command_client` gives: a client of one server, or of a Cluster.
CommandClient: TypeAlias = "aioredis.Redis | RedisCluster"

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


class ClusterUnavailableError(RedisConnectionError):
    """No node of the Cluster could tell where a slot is, or a slot has no master."""


class _BoundedCluster(RedisCluster):
    """A Cluster client that holds at most ``in_flight`` commands, each waiting ``wait`` for its turn."""

    # A timed-out command may have run: it is not sent again (the cluster client would).
    ERRORS_ALLOW_RETRY = (RedisConnectionError, ClusterDownError, SlotNotCoveredError)  # type: ignore[assignment]

    def __init__(self, *, in_flight: int, wait: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._in_flight = in_flight
        self._wait = wait
        self._turns = asyncio.Semaphore(in_flight)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._turns.locked():
            try:
                await asyncio.wait_for(self._turns.acquire(), self._wait)
            except TimeoutError:
                raise RedisBusyError(f"all {self._in_flight} commands stayed in flight for {self._wait}s") from None
        else:
            await self._turns.acquire()
        try:
            return await super().execute_command(*args, **kwargs)
        except RedisClusterException as exc:  # not a RedisError: callers' breakers would not see it
            raise ClusterUnavailableError(str(exc)) from exc
        finally:
            self._turns.release()


def command_client(config: RedisConfig, purpose: str) -> CommandClient:
    """A client for short commands: at most ``max_connections``, a dead connection retried once."""
    cluster = cluster_address(config.url)
    if cluster is not None:
        return _BoundedCluster(
            in_flight=config.max_connections,
            wait=config.timeout_seconds,
            startup_nodes=[ClusterNode(host, port) for host, port in cluster.nodes],
            username=cluster.username,
            password=cluster.password,
            max_connections=config.max_connections,
            socket_timeout=config.timeout_seconds,
            socket_connect_timeout=config.timeout_seconds,
            retry=Retry(NoBackoff(), 1),
            client_name=f"{config.client_name}/{purpose}",
        )
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


class _NextNodeConnection(aioredis.Connection):
    """A connection to one node of a Cluster that tries the next node each time it connects."""

    def __init__(self, *, nodes: tuple[tuple[str, int], ...], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._nodes = itertools.cycle(nodes)

    async def _connect(self) -> None:
        self.host, self.port = next(self._nodes)
        await super()._connect()  # type: ignore[no-untyped-call]


def subscriber_client(config: RedisConfig, purpose: str) -> aioredis.Redis:
    """A client for one subscription: one connection, no read timeout, no silent reconnect."""
    options: dict[str, Any] = {
        "max_connections": 1,
        "timeout": SUBSCRIBER_CONNECT_SECONDS,
        "socket_connect_timeout": max(config.timeout_seconds, SUBSCRIBER_CONNECT_SECONDS),
        "health_check_interval": SUBSCRIBER_HEALTH_CHECK_SECONDS,
        "retry": Retry(NoBackoff(), 0),
        "client_name": f"{config.client_name}/{purpose}",
    }
    cluster = cluster_address(config.url)
    if cluster is None:
        pool = aioredis.BlockingConnectionPool.from_url(config.url, **options)
    else:
        pool = aioredis.BlockingConnectionPool(
            connection_class=_NextNodeConnection,
            nodes=cluster.nodes,
            username=cluster.username,
            password=cluster.password,
            **options,
        )
    return aioredis.Redis.from_pool(pool)
