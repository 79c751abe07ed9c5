"""The feature gate's rows of the isolation canaries (``services/runtime/canary.py``).

One INSERT per tenant table of the schema, ``$1`` being the canary tenant, the plan row
first (the overrides reference it). The usage rows are in the hour of the epoch, outside
any window a usage query or report asks for.
"""

from __future__ import annotations

FEATURES_SENTINELS = {
    "tenant_plans": "INSERT INTO {schema}.tenant_plans (tenant_id, plan) VALUES ($1, 'basic') ON CONFLICT DO NOTHING",
    "feature_overrides": "INSERT INTO {schema}.feature_overrides (tenant_id, feature, enabled) "
    "VALUES ($1, 'isolation_canary', false) ON CONFLICT DO NOTHING",
    "limit_overrides": "INSERT INTO {schema}.limit_overrides (tenant_id, resource, limit_value) "
    "VALUES ($1, 'max_sites', 0) ON CONFLICT DO NOTHING",
    "usage_hourly": "INSERT INTO {schema}.usage_hourly (tenant_id, hour, counter, value) "
    "VALUES ($1, 'epoch', 'read_calls', 0) ON CONFLICT DO NOTHING",
    "usage_flushes": "INSERT INTO {schema}.usage_flushes (tenant_id, flush_id, received_time) "
    "VALUES ($1, '00000000-0000-0000-0000-000000000000', 'epoch') ON CONFLICT DO NOTHING",
}
