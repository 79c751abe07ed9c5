-- Audit events of the audit service's own refusals (cross-tenant attempts on its RPCs),
-- waiting for its relay (services/runtime/audit.py) to append them through WriteEvents
-- like any other service's. The same outbox as every service's.
CREATE TABLE audit_outbox (
    tenant_id   text        NOT NULL CHECK (tenant_id ~ '^[a-z][a-z0-9_-]{2,49}$'),
    event_id    uuid        NOT NULL,
    -- A serialized towerco.audit.v1.AuditEvent.
    event       bytea       NOT NULL,
    create_time timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, event_id)
);
CREATE INDEX audit_outbox_by_age ON audit_outbox (tenant_id, create_time);

ALTER TABLE audit_outbox ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_outbox FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON audit_outbox
    USING (tenant_id = current_setting('app.current_tenant_id', true))
    WITH CHECK (tenant_id = current_setting('app.current_tenant_id', true));
-- The relay's transactions (Database.outbox_transaction) read and delete every tenant's
-- events to hand them over; they bind no tenant, so no other table shows them anything.
CREATE POLICY audit_relay_read ON audit_outbox FOR SELECT
    USING (current_setting('app.audit_relay', true) = 'on');
CREATE POLICY audit_relay_delete ON audit_outbox FOR DELETE
    USING (current_setting('app.audit_relay', true) = 'on');
-- The relay claims rows with SELECT ... FOR UPDATE SKIP LOCKED (so replicas never send the
-- same row at once). Locking a row needs the UPDATE privilege on one of its columns and an
-- UPDATE policy that lets the row through; no WITH CHECK passes in the relay's
-- transaction (no tenant is bound), so it can lock rows but never change them.
CREATE POLICY audit_relay_lock ON audit_outbox FOR UPDATE
    USING (current_setting('app.audit_relay', true) = 'on')
    WITH CHECK (false);

GRANT SELECT, INSERT, DELETE ON audit_outbox TO audit_app;
GRANT UPDATE (create_time) ON audit_outbox TO audit_app;
