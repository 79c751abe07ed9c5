-- Audit events waiting for the audit service (see services/runtime/audit.py). Shared by
-- every service with `outbox=True` in its ServiceSpec; {{app_role}} is its runtime role.
--
-- An event is inserted in the same transaction as the change it describes, so both
-- commit or neither does; the relay deletes it once the audit service has it.
CREATE TABLE audit_outbox (
    tenant_id   text        NOT NULL CHECK (tenant_id ~ '^[a-z][a-z0-9_-]{2,49}$'),
    event_id    uuid        NOT NULL,
    -- A serialized towerco.audit.v1.AuditEvent.
    event       bytea       NOT NULL,
    create_time timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, event_id)
);
CREATE INDEX audit_outbox_by_age ON audit_outbox (tenant_id, create_time);

SELECT platform_meta.isolate_by_tenant('audit_outbox');
-- The relay's transactions (Database.outbox_transaction) read and delete every tenant's
-- events to hand them over; they bind no tenant, so no other table shows them anything.
CREATE POLICY audit_relay_read ON audit_outbox FOR SELECT
    USING (current_setting('app.audit_relay', true) = 'on');
CREATE POLICY audit_relay_delete ON audit_outbox FOR DELETE
    USING (current_setting('app.audit_relay', true) = 'on');
-- Relays claim rows with SELECT ... FOR UPDATE SKIP LOCKED, so that two replicas never
-- send the same event at once. Locking needs UPDATE rights and an UPDATE policy; WITH
-- CHECK (false) makes sure that no row can ever actually be changed through it.
CREATE POLICY audit_relay_lock ON audit_outbox FOR UPDATE
    USING (current_setting('app.audit_relay', true) = 'on')
    WITH CHECK (false);

GRANT UPDATE (create_time) ON audit_outbox TO {{app_role}};
GRANT SELECT, INSERT, DELETE ON audit_outbox TO {{app_role}};
