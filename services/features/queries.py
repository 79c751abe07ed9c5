"""SQL of the feature gate. Every statement names tenant_id; RLS checks it again."""

GET_PLAN = "SELECT plan, version FROM features.tenant_plans WHERE tenant_id = $1"

GET_FEATURE_OVERRIDE = (
    "SELECT enabled, expire_time FROM features.feature_overrides WHERE tenant_id = $1 AND feature = $2"
)

GET_LIMIT_OVERRIDE = "SELECT limit_value FROM features.limit_overrides WHERE tenant_id = $1 AND resource = $2"

GET_FEATURE_OVERRIDES = """
SELECT feature, enabled, expire_time FROM features.feature_overrides WHERE tenant_id = $1 ORDER BY feature
"""

GET_LIMIT_OVERRIDES = """
SELECT resource, limit_value FROM features.limit_overrides WHERE tenant_id = $1 ORDER BY resource
"""

#: Registers a tenant on a plan unless it is registered already; returns the row if inserted.
REGISTER = """
INSERT INTO features.tenant_plans (tenant_id, plan) VALUES ($1, $2)
ON CONFLICT (tenant_id) DO NOTHING
RETURNING version
"""

#: The tenant's row, locked for a change; the caller makes it first if it is missing.
LOCK_PLAN = "SELECT plan FROM features.tenant_plans WHERE tenant_id = $1 FOR UPDATE"

#: Every change also runs BUMP_VERSION once, in the same transaction.
SET_PLAN = "UPDATE features.tenant_plans SET plan = $2 WHERE tenant_id = $1"

BUMP_VERSION = """
UPDATE features.tenant_plans SET version = version + 1, update_time = now()
WHERE tenant_id = $1
RETURNING version
"""

UPSERT_FEATURE_OVERRIDE = """
INSERT INTO features.feature_overrides (tenant_id, feature, enabled, expire_time) VALUES ($1, $2, $3, $4)
ON CONFLICT (tenant_id, feature) DO UPDATE
SET enabled = EXCLUDED.enabled, expire_time = EXCLUDED.expire_time, update_time = now()
"""

UPSERT_LIMIT_OVERRIDE = """
INSERT INTO features.limit_overrides (tenant_id, resource, limit_value) VALUES ($1, $2, $3)
ON CONFLICT (tenant_id, resource) DO UPDATE
SET limit_value = EXCLUDED.limit_value, update_time = now()
"""

#: Remove one override each; they return the removed value, or no row when there was none.
DELETE_FEATURE_OVERRIDE = """
DELETE FROM features.feature_overrides WHERE tenant_id = $1 AND feature = $2
RETURNING enabled, expire_time
"""

DELETE_LIMIT_OVERRIDE = """
DELETE FROM features.limit_overrides WHERE tenant_id = $1 AND resource = $2
RETURNING limit_value
"""

# Usage (0002_usage.sql). A window is [start, end), whole UTC hours.

#: One tenant's counts by hour in a window, oldest first.
USAGE_BY_HOUR = """
SELECT hour, counter, value FROM features.usage_hourly
WHERE tenant_id = $1 AND hour >= $2 AND hour < $3
ORDER BY hour, counter
"""

#: Every tenant's totals in a window, one page of tenants after $3 (keyset on tenant_id),
#: leaving out the tenants in $4. Only in Database.platform_read (the platform_read policy).
#: The tenants are walked one index probe each (a loose index scan on the primary key),
#: and each is summed over the window's hours only: never a scan of every tenant's rows,
#: which years of hours kept for billing would make too slow for a statement's timeout.
USAGE_TOTALS_PAGE = """
WITH RECURSIVE tenants AS (
    (SELECT tenant_id FROM features.usage_hourly WHERE tenant_id > $3 ORDER BY tenant_id LIMIT 1)
    UNION ALL
    SELECT (
        SELECT u.tenant_id FROM features.usage_hourly AS u
        WHERE u.tenant_id > t.tenant_id ORDER BY u.tenant_id LIMIT 1
    )
    FROM tenants AS t WHERE t.tenant_id IS NOT NULL
), page AS (
    SELECT t.tenant_id FROM tenants AS t
    WHERE t.tenant_id IS NOT NULL AND NOT t.tenant_id = ANY($4::text[])
      AND EXISTS (
          SELECT 1 FROM features.usage_hourly AS u
          WHERE u.tenant_id = t.tenant_id AND u.hour >= $1 AND u.hour < $2
      )
    LIMIT $5  -- in tenant_id order: the walk above yields them so, one by one, and stops here
)
SELECT u.tenant_id, u.counter, sum(u.value)::bigint AS value
FROM page JOIN features.usage_hourly AS u ON u.tenant_id = page.tenant_id AND u.hour >= $1 AND u.hour < $2
GROUP BY u.tenant_id, u.counter
ORDER BY u.tenant_id, u.counter
"""
