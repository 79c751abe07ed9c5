"""A tenant transaction takes a pooled connection without arming a timer when one is at hand,
and still answers DATABASE_BUSY after the acquire timeout when none is (``db.idle_at_hand``)."""

from __future__ import annotations

import time
import uuid

import pytest

from services.runtime import context
from services.runtime.context import RequestContext
from services.runtime.db import Database, idle_at_hand
from services.runtime.errors import ServiceError


def _call_of(tenant_id: str) -> RequestContext:
    return RequestContext(request_id=uuid.uuid4().hex, method="/test/Acquire", tenant_id=tenant_id)


async def test_an_idle_open_connection_is_at_hand_and_a_held_or_expired_one_is_not(
    sites_runtime_dsn: str, tenant_pair: tuple[str, str]
) -> None:
    tenant_a, _ = tenant_pair
    db = await Database.connect(sites_runtime_dsn, min_size=1, max_size=1)
    pool = db._pool  # the home cell's
    try:
        assert idle_at_hand(pool)
        with context.bind(_call_of(tenant_a)):
            async with db.transaction(readonly=True) as conn:
                pid = await conn.fetchval("SELECT pg_backend_pid()")
                assert not idle_at_hand(pool)  # the pool's one connection is this transaction's
            assert idle_at_hand(pool)
            await pool.expire_connections()  # asyncpg reconnects an expired one before handing it over
            assert not idle_at_hand(pool)
            async with db.transaction(readonly=True) as conn:
                assert await conn.fetchval("SELECT pg_backend_pid()") != pid
            assert idle_at_hand(pool)
    finally:
        await db.close()


async def test_a_transaction_waiting_for_a_busy_pool_is_answered_database_busy_after_the_acquire_timeout(
    sites_runtime_dsn: str, tenant_pair: tuple[str, str]
) -> None:
    tenant_a, _ = tenant_pair
    db = await Database.connect(sites_runtime_dsn, min_size=1, max_size=1, acquire_timeout=0.3)
    try:
        with context.bind(_call_of(tenant_a)):
            async with db.transaction(readonly=True):
                started = time.monotonic()
                with pytest.raises(ServiceError) as refused:
                    async with db.transaction(readonly=True):
                        raise AssertionError("the pool's one connection is held: none to get")
                waited = time.monotonic() - started
            assert refused.value.reason == "DATABASE_BUSY"
            assert 0.25 <= waited < 5.0
            async with db.transaction(readonly=True) as conn:  # released: at hand again, untimed
                assert await conn.fetchval("SELECT 1") == 1
    finally:
        await db.close()
