-- audit_retention_days joins the limits (services/runtime/plans.py LIMITS): a tenant's
-- override of its plan's audit retention period, or -1 to keep its events forever.
ALTER TABLE limit_overrides DROP CONSTRAINT limit_overrides_resource_check;
ALTER TABLE limit_overrides ADD CONSTRAINT limit_overrides_resource_check
    CHECK (resource IN ('max_sites', 'max_users', 'rpm_read', 'rpm_write', 'db_concurrency', 'audit_retention_days'));
