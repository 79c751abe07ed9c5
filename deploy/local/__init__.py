"""Real local PostgreSQL and Redis servers for ``make run`` and the test suite (no Docker, no sudo)."""

from __future__ import annotations

from .postgres import LocalPostgres, PostgresError, start_postgres, stop_postgres
from .procs import LocalServerError
from .redis_server import LocalRedis, RedisError, redis_server_binary, start_redis, stop_redis

__all__ = [
    "LocalPostgres",
    "LocalRedis",
    "LocalServerError",
    "PostgresError",
    "RedisError",
    "redis_server_binary",
    "start_postgres",
    "start_redis",
    "stop_postgres",
    "stop_redis",
]
