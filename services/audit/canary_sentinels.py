"""The audit log's rows of the isolation canaries (``services/runtime/canary.py``).

The sentinel is the first event of the canary's chain. Its hash is not the chain's (no
one verifies a canary's log); the retention purge never removes a tenant's newest event,
so it stays.
"""

from __future__ import annotations

AUDIT_SENTINELS = {
    "events": "INSERT INTO {schema}.events (tenant_id, sequence, event_id, user_id, action, resource, details, "
    "ip_address, request_id, outcome, create_time, prev_hash, hash) "
    "VALUES ($1, 1, '00000000-0000-4000-8000-00000000ca11', '', 'canary.sentinel', '', '{{}}'::jsonb, '', "
    "'isolation-canary', 'OK', now(), '', repeat('0', 64)) ON CONFLICT DO NOTHING",
}
