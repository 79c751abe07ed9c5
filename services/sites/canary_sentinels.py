"""The sites service's rows of the isolation canaries (``services/runtime/canary.py``).

One INSERT per tenant table of the schema, ``$1`` being the canary tenant; the tables of
the ``tenant_data`` bookkeeping have the shared sentinels, ``audit_outbox`` none.
"""

from __future__ import annotations

SITES_SENTINELS = {
    "sites": "INSERT INTO {schema}.sites (tenant_id, site_id, name) "
    "VALUES ($1, 'isolation-canary', 'Isolation canary sentinel') ON CONFLICT DO NOTHING",
    "create_requests": "INSERT INTO {schema}.create_requests (tenant_id, request_id, request_hash, response) "
    "VALUES ($1, 'isolation-canary', '', ''::bytea) ON CONFLICT DO NOTHING",
}
