-- Legal hold (SetLegalHold): while set, the audit retention job purges none of the
-- tenant's events. A flag of its own, not an audit_retention_days override of -1
-- (that stays "keep forever" by plan or override).
ALTER TABLE tenant.tenants
    ADD COLUMN legal_hold        boolean NOT NULL DEFAULT false,
    ADD COLUMN legal_hold_reason text    NOT NULL DEFAULT '';
