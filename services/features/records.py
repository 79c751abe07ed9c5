"""Reading and writing a tenant's entitlement record in the feature gate's schema."""

from __future__ import annotations

from typing import Any, TypeAlias

import asyncpg

from services.runtime import context
from services.runtime.db import Database
from services.runtime.entitlements import FeatureOverride, Record, RecordSource
from services.runtime.tenant_cache import Versioned

from . import queries

Conn: TypeAlias = "asyncpg.Connection[Any]"


async def load(conn: Conn, tenant_id: str) -> tuple[int, Record] | None:
    """The tenant's version and record, read in the caller's transaction; None if unregistered."""
    row = await conn.fetchrow(queries.GET_PLAN, tenant_id)
    if row is None:
        return None
    features = {
        r["feature"]: FeatureOverride(r["enabled"], r["expire_time"].timestamp() if r["expire_time"] else None)
        for r in await conn.fetch(queries.GET_FEATURE_OVERRIDES, tenant_id)
    }
    limits = {r["resource"]: r["limit_value"] for r in await conn.fetch(queries.GET_LIMIT_OVERRIDES, tenant_id)}
    return row["version"], Record(row["plan"], features, limits)


def record_source(db: Database) -> RecordSource:
    """The feature gate reads records from its own tables (bound to that one tenant)."""

    async def read(tenant_id: str) -> Versioned:
        with context.system_scope(tenant_id, "entitlements"):
            async with db.transaction(readonly=True) as conn:
                found = await load(conn, tenant_id)
        return Versioned(0, None) if found is None else Versioned(found[0], found[1].as_value())

    return read
