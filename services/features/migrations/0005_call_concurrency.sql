-- call_concurrency joins the limits (services/runtime/plans.py LIMITS): a tenant's
-- override of the calls it may have in flight at once in each service process. Its
-- refusals are counted in the usage as calls_limited (services/runtime/usage.py).
ALTER TABLE limit_overrides DROP CONSTRAINT limit_overrides_resource_check;
ALTER TABLE limit_overrides ADD CONSTRAINT limit_overrides_resource_check
    CHECK (resource IN ('max_sites', 'max_users', 'rpm_read', 'rpm_write', 'db_concurrency', 'audit_retention_days',
                        'call_concurrency'));
ALTER TABLE usage_hourly DROP CONSTRAINT usage_hourly_counter_check;
ALTER TABLE usage_hourly ADD CONSTRAINT usage_hourly_counter_check CHECK (
    counter IN ('read_calls', 'write_calls', 'rate_limited', 'plan_refused', 'db_microseconds', 'calls_limited')
    OR counter ~ '^feature:[a-z][a-z0-9_]{0,63}$'
);
