"""Start-up isolation guard: refuse to serve if RLS could be bypassed.

Checked against the live database with the runtime role's own connection:
- the role is not a superuser, has no BYPASSRLS or REPLICATION, and is not (a member of) the owner of
  any table in the service's schema (owners skip RLS unless FORCE is set, and could
  turn it off);
- every table in the schema has row-level security ENABLED and FORCED and at least one
  policy.
"""

from __future__ import annotations

from typing import Any

import asyncpg


class IsolationError(RuntimeError):
    """The database would not enforce tenant isolation for this service."""


ROLE_SQL = """
SELECT r.rolname, r.rolsuper, r.rolbypassrls, r.rolreplication
FROM pg_roles r
WHERE pg_has_role(current_user, r.oid, 'MEMBER')
  AND (r.rolsuper OR r.rolbypassrls OR r.rolreplication)
"""

OWNED_SQL = """
SELECT $1 || '.' || c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND pg_has_role(current_user, c.relowner, 'MEMBER')
UNION ALL
SELECT 'schema ' || n.nspname FROM pg_namespace n
WHERE n.nspname = $1 AND pg_has_role(current_user, n.nspowner, 'MEMBER')
"""

# Every relation that stores rows: a materialized view (or a foreign table) cannot be
# protected by RLS, so one in a service schema is reported rather than silently skipped.
TABLES_SQL = """
SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity,
       (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid) AS policies
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'm', 'f')
ORDER BY c.relname
"""


async def check_isolation(conn: asyncpg.Connection[Any], schema: str) -> None:
    """Raise :class:`IsolationError` naming every problem found; return if all is well."""
    problems: list[str] = []
    user = await conn.fetchval("SELECT current_user")
    for row in await conn.fetch(ROLE_SQL):
        what = "SUPERUSER" if row["rolsuper"] else "BYPASSRLS" if row["rolbypassrls"] else "REPLICATION"
        via = "" if row["rolname"] == user else f" through membership in {row['rolname']}"
        problems.append(f"runtime role {user} has {what}{via}")
    for row in await conn.fetch(OWNED_SQL, schema):
        problems.append(f"runtime role {user} owns (or is a member of the owner of) {row[0]}")
    tables = await conn.fetch(TABLES_SQL, schema)
    if not tables:
        problems.append(f"schema {schema} has no tables (or the runtime role cannot see them)")
    for row in tables:
        name = f"{schema}.{row['relname']}"
        if not row["relrowsecurity"]:
            problems.append(f"{name} does not ENABLE ROW LEVEL SECURITY")
        if not row["relforcerowsecurity"]:
            problems.append(f"{name} does not FORCE ROW LEVEL SECURITY")
        if row["policies"] == 0:
            problems.append(f"{name} has no row-level security policy")
    if problems:
        raise IsolationError("tenant isolation is not enforced: " + "; ".join(problems))
