-- Bookkeeping of TenantDataService (services/runtime/tenant_data.py) for services that
-- apply it as a shared component (ServiceSpec.components); {{app_role}} is their runtime
-- role. (The sites service has the same tables from its own released 0002 migration.)
--
-- Which parts of a tenant migration finished in a target tenant, and the key of every
-- row each one wrote, so a repeat copies nothing more and an undo removes exactly those
-- rows. Both belong to the target tenant: tenant_id leads their keys, RLS as everywhere.

CREATE TABLE tenant_migrations (
    tenant_id        text        NOT NULL CHECK (tenant_id ~ '^[a-z][a-z0-9_-]{2,49}$'),
    migration_id     text        NOT NULL,
    data_type        text        NOT NULL,
    source_tenant_id text        NOT NULL,
    row_count        bigint      NOT NULL CHECK (row_count >= 0),
    create_time      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, migration_id, data_type)
);

CREATE TABLE tenant_migration_rows (
    tenant_id    text   NOT NULL CHECK (tenant_id ~ '^[a-z][a-z0-9_-]{2,49}$'),
    migration_id text   NOT NULL,
    data_type    text   NOT NULL,
    row_key      text[] NOT NULL,
    PRIMARY KEY (tenant_id, migration_id, data_type, row_key)
);

SELECT platform_meta.isolate_by_tenant('tenant_migrations');
SELECT platform_meta.isolate_by_tenant('tenant_migration_rows');

GRANT SELECT, INSERT, DELETE ON tenant_migrations TO {{app_role}};
GRANT SELECT, INSERT, DELETE ON tenant_migration_rows TO {{app_role}};
