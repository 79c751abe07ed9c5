"""Tombstones expire: a deleted tenant's row is removed ``TENANT_TOMBSTONE_DAYS`` after its last change.

Offboarding leaves the tenant row in STATE_DELETED (everything else of the tenant in the
registry is gone by then). That row is what keeps the id from being reused, and what the
usage report reads a deleted tenant's plan from ("the registry's once a tenant is
deleted"); usage is kept ``USAGE_RETENTION_DAYS`` (760) after the hour it counts, so the
tombstone is kept longer (790 by default): a deleted tenant's usage is gone before its
tombstone, and an id reused afterwards never meets the old tenant's usage. Once the
tombstone is gone the id may be created again.

The purge runs on the shared machinery (``services/runtime/idempotency_purge.py``): the
deleted tenants past the period from one platform read, then each one's row removed in one
short transaction bound to it, with what may still hang off it in the registry's schema
(a migration's settings backup; host routes, settings and users are gone at offboarding,
deleted again for safety). A tombstone under legal hold stays. Idempotent: a removed
tombstone is simply not found again.
A restrictive policy (migration 0003) lets the runtime role delete only a DELETED row.
"""

from __future__ import annotations

from services.runtime.idempotency_purge import IdempotencyPurge, Records
from services.runtime.server import Runtime

DAY_SECONDS = 86400.0

# A tombstone under legal hold stays (the hold is lifted first).
_EXPIRED = "state = 'STATE_DELETED' AND NOT legal_hold AND update_time < now() - make_interval(secs => {})"

_CHILDREN = ("migration_settings_backup", "host_routes", "tenant_settings", "tenant_users", "tenant_roles")

# One row per tenant, so the batch bound ($3) is always met. The children go first in the
# same statement (a NO ACTION foreign key is checked at its end).
TOMBSTONES = Records(
    table="tenant.tenants",
    tenants_sql="SELECT tenant_id FROM tenant.tenants WHERE " + _EXPIRED.format("$1"),
    purge_sql="WITH doomed AS (SELECT tenant_id FROM tenant.tenants WHERE tenant_id = $1 AND $3::int > 0 AND "
    + _EXPIRED.format("$2")
    + ")"
    + "".join(
        f", {child} AS (DELETE FROM tenant.{child} WHERE tenant_id IN (SELECT tenant_id FROM doomed))"
        for child in _CHILDREN
    )
    + " DELETE FROM tenant.tenants WHERE tenant_id IN (SELECT tenant_id FROM doomed) AND "
    + _EXPIRED.format("$2"),
    what="tenant tombstones",
    purpose="tenant.tombstone_purge",
)


def start_tombstone_purge(runtime: Runtime) -> None:
    """Runs the purge in ``runtime``'s process, started and stopped with it."""
    settings = runtime.settings
    purge = IdempotencyPurge(
        runtime.db,
        TOMBSTONES,
        settings.tenant_tombstone_days * DAY_SECONDS,
        settings.retention_purge_interval_seconds,
    )
    runtime.on_start(purge.start)
    runtime.on_stop(purge.close)
