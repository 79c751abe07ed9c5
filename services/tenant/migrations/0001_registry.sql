-- The tenant registry. Runs as tenant_owner with search_path = tenant.
--
-- Every table is tenant-bound by RLS like any other service's. Two read-only
-- platform views cross tenants, and only inside a transaction that the registry
-- opens explicitly for them (Database.platform_read: `app.platform_read` = 'on', READ ONLY):
-- listing tenants for platform admins, and finding the tenant behind a host name.

CREATE TABLE tenants (
    tenant_id      text        NOT NULL CHECK (tenant_id ~ '^[a-z][a-z0-9_-]{2,49}$'),
    display_name   text        NOT NULL CHECK (length(display_name) BETWEEN 1 AND 100),
    state          text        NOT NULL CHECK (state IN ('STATE_PROVISIONING', 'STATE_ACTIVE', 'STATE_SUSPENDED',
                                                         'STATE_DELETING', 'STATE_DELETED')),
    plan           text        NOT NULL,
    admin_email    text        NOT NULL,
    suspend_reason text        NOT NULL DEFAULT '',
    -- Grows with every change of the record or its settings; caches keep the newest.
    version        bigint      NOT NULL DEFAULT 1,
    -- Idempotent creation: the request that created the tenant, and a hash of its body.
    request_id     text,
    request_hash   text,
    create_time    timestamptz NOT NULL DEFAULT now(),
    update_time    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id)
);

-- Host names that serve a tenant besides its sub-domain. A host belongs to one tenant
-- platform-wide, so `host` alone is unique: this is the registry's routing directory,
-- the one table keyed by something other than tenant_id (a reference table under Citus).
CREATE TABLE host_routes (
    host        text        NOT NULL CHECK (host = lower(host) AND length(host) BETWEEN 1 AND 253),
    tenant_id   text        NOT NULL REFERENCES tenants (tenant_id),
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (host)
);
CREATE INDEX host_routes_by_tenant ON host_routes (tenant_id, host);

-- The settings document of each tenant (secrets sealed with AES-GCM inside it).
CREATE TABLE tenant_settings (
    tenant_id   text        NOT NULL REFERENCES tenants (tenant_id),
    document    jsonb       NOT NULL,
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id)
);

-- The tenant's users known to the platform; the first is its administrator.
CREATE TABLE tenant_users (
    tenant_id   text        NOT NULL REFERENCES tenants (tenant_id),
    user_id     text        NOT NULL,
    email       text        NOT NULL,
    role        text        NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id),
    UNIQUE (tenant_id, email)
);

-- Data migrations between tenants, owned by the platform tenant that runs them.
CREATE TABLE migrations (
    tenant_id        text        NOT NULL DEFAULT 'platform',
    migration_id     uuid        NOT NULL,
    source_tenant_id text        NOT NULL,
    target_tenant_id text        NOT NULL,
    data_types       text[]      NOT NULL,
    state            text        NOT NULL CHECK (state IN ('STATE_PENDING', 'STATE_RUNNING', 'STATE_SUCCEEDED',
                                                           'STATE_FAILED', 'STATE_ROLLED_BACK')),
    error            text        NOT NULL DEFAULT '',
    request_id       text,
    request_hash     text,
    -- The registry process running it, and until when that claim holds (renewed while it
    -- runs): another replica takes over only a migration whose claim has expired.
    lease_owner      text,
    lease_until      timestamptz,
    create_time      timestamptz NOT NULL DEFAULT now(),
    update_time      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, migration_id),
    UNIQUE (tenant_id, request_id)
);
CREATE INDEX migrations_unfinished ON migrations (tenant_id, state, migration_id);

-- The registry's own part of a migration (`settings`): the target's settings before
-- the copy, so that an undo can put them back.
CREATE TABLE migration_settings_backup (
    tenant_id    text        NOT NULL REFERENCES tenants (tenant_id),
    migration_id uuid        NOT NULL,
    document     jsonb       NOT NULL,
    create_time  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, migration_id)
);

SELECT platform_meta.isolate_by_tenant('tenants');
CREATE POLICY platform_read ON tenants FOR SELECT
    USING (current_setting('app.platform_read', true) = 'on');

SELECT platform_meta.isolate_by_tenant('host_routes');
CREATE POLICY platform_read ON host_routes FOR SELECT
    USING (current_setting('app.platform_read', true) = 'on');

SELECT platform_meta.isolate_by_tenant('tenant_settings');

SELECT platform_meta.isolate_by_tenant('tenant_users');

SELECT platform_meta.isolate_by_tenant('migrations');

SELECT platform_meta.isolate_by_tenant('migration_settings_backup');

GRANT SELECT, INSERT, UPDATE ON tenants TO tenant_app;
GRANT SELECT, INSERT, DELETE ON host_routes TO tenant_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON tenant_settings TO tenant_app;
GRANT SELECT, INSERT, DELETE ON tenant_users TO tenant_app;
GRANT SELECT, INSERT, UPDATE ON migrations TO tenant_app;
GRANT SELECT, INSERT, DELETE ON migration_settings_backup TO tenant_app;

-- The platform's own tenant: its admins administer every other tenant.
SELECT set_config('app.current_tenant_id', 'platform', true);
INSERT INTO tenants (tenant_id, display_name, state, plan, admin_email)
VALUES ('platform', 'Towerco platform', 'STATE_ACTIVE', 'enterprise', 'platform-admins@towerco.invalid');
