-- Moves of tenants between database cells (MoveTenant, services/tenant/tenant_move.py). Read
-- and written by the registry's mover through its own DSN (TENANT_MOVER_DATABASE_URLS); the
-- runtime role sees a tenant's own rows only, as in every tenant table (the isolation canary).
CREATE TABLE tenant_moves (
    tenant_id text NOT NULL,
    move_id uuid NOT NULL,
    request_id text NOT NULL,
    source_cell text NOT NULL,
    target_cell text NOT NULL,
    -- PENDING, FROZEN, COPIED, SWITCHED, DONE, ROLLED_BACK
    stage text NOT NULL DEFAULT 'PENDING',
    error text NOT NULL DEFAULT '',
    rows jsonb NOT NULL DEFAULT '{}'::jsonb,
    frozen_at timestamptz,
    freeze_ms bigint,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, move_id),
    UNIQUE (tenant_id, request_id)
);
-- One move of a tenant at a time.
CREATE UNIQUE INDEX tenant_moves_one_active ON tenant_moves (tenant_id) WHERE stage NOT IN ('DONE', 'ROLLED_BACK');
SELECT platform_meta.isolate_by_tenant('tenant_moves');
GRANT SELECT, INSERT, UPDATE, DELETE ON tenant_moves TO tenant_app;
