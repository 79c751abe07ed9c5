"""SQL of the audit service. Every statement filters on tenant_id; RLS is the net."""

from __future__ import annotations

from datetime import datetime

#: One chain per tenant: appends to it are serialized by this transaction-level lock.
#: Two-key form: the first key namespaces the audit chains among the platform's advisory
#: locks, the second is the tenant (a hash collision only makes two tenants take turns).
LOCK_CHAIN = "SELECT pg_advisory_xact_lock(1096107092, hashtext($1))"  # 1096107092 = b'AUDT'

CHAIN_HEAD = "SELECT sequence, hash FROM audit.events WHERE tenant_id = $1 ORDER BY sequence DESC LIMIT 1"

KNOWN_EVENT_IDS = "SELECT event_id FROM audit.events WHERE tenant_id = $1 AND event_id = ANY($2::uuid[])"

INSERT_EVENTS = """
INSERT INTO audit.events (tenant_id, sequence, event_id, user_id, action, resource, details, ip_address,
                          request_id, outcome, create_time, prev_hash, hash)
SELECT $1, e.sequence, e.event_id, e.user_id, e.action, e.resource, e.details::jsonb, e.ip_address,
       e.request_id, e.outcome, e.create_time, e.prev_hash, e.hash
FROM unnest($2::bigint[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
            $9::text[], $10::text[], $11::timestamptz[], $12::text[], $13::text[])
     AS e(sequence, event_id, user_id, action, resource, details, ip_address, request_id, outcome, create_time,
          prev_hash, hash)
"""

COLUMNS = (
    "tenant_id, sequence, event_id, user_id, action, resource, details, ip_address, request_id, outcome, "
    "create_time, prev_hash, hash"
)

#: The whole chain in order, read through a cursor (one snapshot, fetched in batches).
CHAIN = f"SELECT {COLUMNS} FROM audit.events WHERE tenant_id = $1 ORDER BY sequence"


def list_events(
    *,
    before: int | None,
    action: str,
    resource: str,
    user_id: str,
    start_time: datetime | None,
    end_time: datetime | None,
) -> tuple[str, list[object]]:
    """ListEvents' statement and arguments after $1 (tenant), ending with the LIMIT.

    Only the filters that are set appear in the SQL, so each combination gets a plan that
    uses its index (a generic ``$n IS NULL OR ...`` plan would scan the tenant's events).
    """
    where = ["tenant_id = $1"]
    args: list[object] = []

    def condition(sql: str, value: object) -> None:
        args.append(value)
        where.append(sql.format(f"${len(args) + 1}"))

    if before is not None:
        condition("sequence < {}", before)
    if action:
        condition("action = {}", action)
    if resource:
        condition("resource = {}", resource)
    if user_id:
        condition("user_id = {}", user_id)
    if start_time is not None:
        condition("create_time >= {}", start_time)
    if end_time is not None:
        condition("create_time < {}", end_time)
    limit = f"${len(args) + 2}"
    return f"SELECT {COLUMNS} FROM audit.events WHERE {' AND '.join(where)} ORDER BY sequence DESC LIMIT {limit}", args
