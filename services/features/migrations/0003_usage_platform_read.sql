-- The billing export (FeatureGateService.ListTenantUsage, platform admins only) reads every
-- tenant's hourly usage in one READ ONLY transaction (Database.platform_read: no tenant
-- bound, `app.platform_read` = 'on'), as ListTenants reads the registry's directory.
-- SELECT only: writes still need the tenant bound by tenant_isolation.
CREATE POLICY platform_read ON usage_hourly FOR SELECT
    USING (current_setting('app.platform_read', true) = 'on');
