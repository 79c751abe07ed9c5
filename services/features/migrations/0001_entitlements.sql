-- The feature gate's records. Runs as features_owner with search_path = features.
--
-- Plans themselves live in the reviewed plans file (services/features/plans.toml); the
-- database holds which plan each tenant is on and its per-tenant overrides. `version`
-- grows with every change of a tenant's plan or overrides, so caches in every service
-- keep the newest (services/runtime/entitlements.py).

CREATE TABLE tenant_plans (
    tenant_id   text        NOT NULL CHECK (tenant_id ~ '^[a-z][a-z0-9_-]{2,49}$'),
    plan        text        NOT NULL CHECK (plan ~ '^[a-z][a-z0-9_]{0,31}$'),
    version     bigint      NOT NULL DEFAULT 1 CHECK (version >= 1),
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id)
);

CREATE TABLE feature_overrides (
    tenant_id   text        NOT NULL,
    feature     text        NOT NULL CHECK (feature ~ '^[a-z][a-z0-9_]{0,63}$'),
    enabled     boolean     NOT NULL,
    -- NULL: until changed; otherwise the plan decides again from this moment.
    expire_time timestamptz,
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, feature),
    FOREIGN KEY (tenant_id) REFERENCES tenant_plans (tenant_id) ON DELETE CASCADE
);

CREATE TABLE limit_overrides (
    tenant_id   text        NOT NULL,
    resource    text        NOT NULL
        CHECK (resource IN ('max_sites', 'max_users', 'rpm_read', 'rpm_write', 'db_concurrency')),
    limit_value bigint      NOT NULL CHECK (limit_value >= -1),
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, resource),
    FOREIGN KEY (tenant_id) REFERENCES tenant_plans (tenant_id) ON DELETE CASCADE
);

SELECT platform_meta.isolate_by_tenant('tenant_plans');
SELECT platform_meta.isolate_by_tenant('feature_overrides');
SELECT platform_meta.isolate_by_tenant('limit_overrides');

GRANT SELECT, INSERT, UPDATE, DELETE ON tenant_plans, feature_overrides, limit_overrides TO features_app;
