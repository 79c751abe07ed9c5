-- Tenant users managed through UserService (services/tenant/users.py), and custom roles.
--
-- A user is ACTIVE or DEACTIVATED; a deleted user's row is gone (its seat freed, its
-- tokens refused as naming no one). A create's request_id and body hash stay on the row
-- it made: a retry returns that user for as long as it exists.
ALTER TABLE tenant_users
    ADD COLUMN state        text        NOT NULL DEFAULT 'STATE_ACTIVE'
                                        CHECK (state IN ('STATE_ACTIVE', 'STATE_DEACTIVATED')),
    ADD COLUMN update_time  timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN request_id   text,
    ADD COLUMN request_hash text,
    ADD CONSTRAINT tenant_users_request UNIQUE (tenant_id, request_id);
GRANT UPDATE ON tenant_users TO tenant_app;

-- A tenant's own roles: named sets of permissions (checked by the registry against the
-- known ones and the tenant's plan when written). Built-in roles are not rows.
CREATE TABLE tenant_roles (
    tenant_id   text        NOT NULL REFERENCES tenants (tenant_id),
    role_id     text        NOT NULL CHECK (role_id ~ '^[a-z][a-z0-9_-]{2,31}$'),
    permissions text[]      NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, role_id)
);
SELECT platform_meta.isolate_by_tenant('tenant_roles');
GRANT SELECT, INSERT, UPDATE, DELETE ON tenant_roles TO tenant_app;
