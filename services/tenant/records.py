"""Rows to messages, and the registry's reads through the tenant cache."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg
from google.protobuf import json_format, timestamp_pb2
from towerco.tenant.v1 import tenant_registry_service_pb2 as pb

from services.runtime import context
from services.runtime.db import Database
from services.runtime.errors import ErrorReason, failed_precondition, not_found
from services.runtime.tenant_cache import TenantCache, Versioned
from services.runtime.tenants import STATE_KIND, StateSource
from services.runtime.user_access import UserSource

from . import queries, tenant_settings_rules, tenant_settings_store, user_records

SETTINGS_KIND = "settings"
State = pb.Tenant.State
Migration = pb.Migration
#: States in which a tenant's data is being or has been removed.
GONE = ("STATE_DELETING", "STATE_DELETED")


def tenant_from_row(row: Mapping[str, Any]) -> pb.Tenant:
    tenant = pb.Tenant(
        tenant_id=row["tenant_id"],
        display_name=row["display_name"],
        state=State.Value(row["state"]),
        plan=row["plan"],
        admin_email=row["admin_email"],
        domains=list(row["domains"] or ()),
        suspend_reason=row["suspend_reason"],
        legal_hold=row["legal_hold"],
        legal_hold_reason=row["legal_hold_reason"],
    )
    tenant.create_time.CopyFrom(_timestamp(row["create_time"]))
    tenant.update_time.CopyFrom(_timestamp(row["update_time"]))
    return tenant


def migration_from_row(row: Mapping[str, Any]) -> pb.Migration:
    migration = pb.Migration(
        migration_id=str(row["migration_id"]),
        source_tenant_id=row["source_tenant_id"],
        target_tenant_id=row["target_tenant_id"],
        data_types=list(row["data_types"]),
        state=Migration.State.Value(row["state"]),
        error=row["error"],
    )
    migration.create_time.CopyFrom(_timestamp(row["create_time"]))
    migration.update_time.CopyFrom(_timestamp(row["update_time"]))
    return migration


def state_value(row: Mapping[str, Any]) -> dict[str, Any]:
    """The cached state of a tenant, as every service reads it."""
    return {"state": row["state"], "plan": row["plan"], "legal_hold": row["legal_hold"], "cell": row["cell"] or ""}


def settings_value(row: Mapping[str, Any], document: Mapping[str, Any] | None) -> dict[str, Any]:
    """The cached settings of a tenant: masked (no secret ever enters a cache) plus its name."""
    tenant_id = row["tenant_id"]
    settings = (
        tenant_settings_store.from_document(dict(document), tenant_id)
        if document is not None
        else tenant_settings_rules.default_settings(tenant_id, row["display_name"])
    )
    return {"display_name": row["display_name"], "settings": json_format.MessageToDict(settings)}


def settings_from_value(value: Mapping[str, Any]) -> pb.TenantSettings:
    return json_format.ParseDict(value["settings"], pb.TenantSettings())


def _timestamp(value: Any) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def state_source(db: Database) -> StateSource:
    """The registry reads tenant state from its own tables (bound to that one tenant)."""

    async def load(tenant_id: str) -> Versioned:
        with context.system_scope(tenant_id, "tenant-state"):
            async with db.transaction(readonly=True) as conn:
                row = await conn.fetchrow(queries.GET_TENANT, tenant_id)
        return Versioned(0, None) if row is None else Versioned(row["version"], state_value(row))

    return load


def user_source(db: Database) -> UserSource:
    """The registry reads a user's access from its own tables, at the tenant's version."""

    async def load(tenant_id: str, user_id: str) -> Versioned:
        with context.system_scope(tenant_id, "user-access"):
            async with db.transaction(readonly=True) as conn:
                # The version first: a change committing in between is labelled older, never newer.
                version = await conn.fetchval(queries.TENANT_VERSION, tenant_id)
                row = await conn.fetchrow(queries.GET_USER_ACCESS, tenant_id, user_id) if version else None
        if not version:
            return Versioned(0, None)
        return Versioned(version, None if row is None else user_records.access_of(row).as_value())

    return load


async def read_settings(db: Database, cache: TenantCache, tenant_id: str) -> Versioned:
    """A tenant's masked settings and display name, through the cache."""

    async def load() -> Versioned:
        with context.system_scope(tenant_id, "tenant-settings"):
            async with db.transaction(readonly=True) as conn:
                row = await conn.fetchrow(queries.GET_TENANT, tenant_id)
                document = await conn.fetchval(queries.GET_SETTINGS, tenant_id) if row is not None else None
        if row is None:
            return Versioned(0, None)
        if row["state"] == "STATE_DELETED":  # its settings went with its data; defaults would be made up
            return Versioned(row["version"], None)
        return Versioned(row["version"], settings_value(row, document))

    return await cache.get(tenant_id, SETTINGS_KIND, load)


async def publish(cache: TenantCache, row: Mapping[str, Any], document: Mapping[str, Any] | None = None) -> None:
    """Tell every process about a committed change of a tenant (state, and settings if given)."""
    values: dict[str, dict[str, Any] | None] = {STATE_KIND: state_value(row)}
    if document is not None:
        values[SETTINGS_KIND] = settings_value(row, document)
    await cache.publish(row["tenant_id"], row["version"], values)


async def lock_live_tenant(conn: asyncpg.Connection[Any], tenant_id: str, gone_because: str) -> Any:
    """The tenant's row, locked for this transaction: NOT_FOUND if there is none, and
    FAILED_PRECONDITION (TENANT_STATE_CONFLICT) if it is being or has been deleted, the
    message ending with ``gone_because``."""
    row = await conn.fetchrow(queries.GET_TENANT_FOR_UPDATE, tenant_id)
    if row is None:
        raise not_found(ErrorReason.TENANT_NOT_FOUND, tenant_id)
    if row["state"] in GONE:
        raise failed_precondition(
            f"tenant {tenant_id!r} is {row['state']}{gone_because}",
            ErrorReason.TENANT_STATE_CONFLICT,
            state=row["state"],
        )
    return row
