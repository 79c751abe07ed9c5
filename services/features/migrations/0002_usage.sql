-- Usage metering: what each tenant used, per hour, exactly (billing, cost allocation, limits).
-- Runs as features_owner with search_path = features.
--
-- Every service process counts in memory per (tenant, hour, counter) and flushes per-tenant
-- batches through TenantUsageService.RecordUsage (services/runtime/usage.py). A batch
-- carries a flush_id made once and kept across retries: the feature gate inserts it into
-- usage_flushes and adds to usage_hourly in one transaction, so a repeated batch (its
-- acknowledgement lost) finds its flush_id there and counts nothing.
--
-- No foreign key to tenant_plans: usage outlives the tenant's plan record, since billing
-- needs it after offboarding.

CREATE TABLE usage_hourly (
    tenant_id text        NOT NULL CHECK (tenant_id ~ '^[a-z][a-z0-9_-]{2,49}$'),
    -- The start of the UTC hour the counts fall in.
    hour      timestamptz NOT NULL CHECK (extract(epoch FROM hour) % 3600 = 0),
    -- read_calls, write_calls, rate_limited, plan_refused, db_microseconds, feature:<name>
    counter   text        NOT NULL CHECK (
        counter IN ('read_calls', 'write_calls', 'rate_limited', 'plan_refused', 'db_microseconds')
        OR counter ~ '^feature:[a-z][a-z0-9_]{0,63}$'
    ),
    value     bigint      NOT NULL CHECK (value >= 0),
    PRIMARY KEY (tenant_id, hour, counter)
);

CREATE TABLE usage_flushes (
    tenant_id     text        NOT NULL CHECK (tenant_id ~ '^[a-z][a-z0-9_-]{2,49}$'),
    flush_id      uuid        NOT NULL,
    received_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, flush_id)
);

SELECT platform_meta.isolate_by_tenant('usage_hourly');
SELECT platform_meta.isolate_by_tenant('usage_flushes');

GRANT SELECT, INSERT, UPDATE, DELETE ON usage_hourly, usage_flushes TO features_app;
