"""The retention purge: the one way audit events are ever deleted.

Audit events are append-only for everyone (``0001_events.sql``): a trigger refuses UPDATE
and DELETE from the runtime role, the owner and superusers alike, and TRUNCATE always.
The one exception is DELETE run as ``audit_retention``, a NOLOGIN role that no service
runs as and no runtime role is a member of. It may read every tenant's events and
delete them, nothing else; :func:`ensure_retention_role` makes it, with the
administrative DSN, after the migrations.

An operator purges from the administrative DSN (a superuser, or a role granted
``audit_retention``)::

    SET ROLE audit_retention;
    SELECT audit.purge_events(now() - interval '400 days');              -- every tenant
    SELECT audit.purge_events(now() - interval '90 days', 'tenant_b');   -- one tenant (its plan's period)
    RESET ROLE;

``audit.purge_events(cutoff[, only_tenant])`` returns how many events it deleted. For
each tenant it deletes the oldest events up to (not including) the first one created at
or after ``cutoff``, and never the newest one: what remains is an unbroken tail of the
chain, and new events continue its sequence rather than starting a new chain at 1.
VerifyChain then trusts the first remaining event's ``prev_hash`` as the chain's start.
A plain ``DELETE FROM audit.events WHERE ...`` as ``audit_retention`` is allowed as well,
but one that leaves a hole in a chain makes VerifyChain report that tenant's chain
broken, as it should.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg

log = logging.getLogger("towerco.audit")

RETENTION_ROLE = "audit_retention"
OWNER_ROLE = "audit_owner"

_GRANTS = (
    f"GRANT USAGE ON SCHEMA audit TO {RETENTION_ROLE}",
    f"GRANT SELECT, DELETE ON audit.events TO {RETENTION_ROLE}",
    f"GRANT EXECUTE ON FUNCTION audit.purge_events(timestamptz, text) TO {RETENTION_ROLE}",
)


async def ensure_retention_role(admin_dsn: str) -> None:
    """Create ``audit_retention`` if missing, re-assert its limits and grant it the purge.

    Idempotent; run with the administrative DSN once the audit migrations are applied
    (the shared migrations create only ``audit_owner`` and ``audit_app``, and the owner
    may not create roles). The grants are made as the owner, as a migration would.
    """
    conn: asyncpg.Connection[Any] = await asyncpg.connect(admin_dsn)
    try:
        async with conn.transaction():
            if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", RETENTION_ROLE):
                await conn.execute(f"CREATE ROLE {RETENTION_ROLE} NOLOGIN")
                log.info("created role %s (the audit retention purge)", RETENTION_ROLE)
            await conn.execute(
                f"ALTER ROLE {RETENTION_ROLE} NOLOGIN NOSUPERUSER NOBYPASSRLS NOREPLICATION NOCREATEDB NOCREATEROLE"
            )
            if not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
                # So that this administrator can `SET ROLE audit_retention` to purge.
                await conn.execute(f"GRANT {RETENTION_ROLE} TO current_user")
            await conn.execute(f"SET LOCAL ROLE {OWNER_ROLE}")
            for grant in _GRANTS:
                await conn.execute(grant)
    finally:
        await conn.close()
