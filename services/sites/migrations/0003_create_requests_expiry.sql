-- Idempotency records expire (IDEMPOTENCY_WINDOW_SECONDS): the purge (services/runtime/
-- idempotency_purge.py) finds which tenants hold records older than the window in one
-- READ ONLY platform read (tenant ids only), then deletes each tenant's old records in
-- small batches in transactions bound to that tenant.
CREATE INDEX create_requests_by_age ON create_requests (tenant_id, create_time);

CREATE POLICY platform_read ON create_requests FOR SELECT
    USING (current_setting('app.platform_read', true) = 'on');
