-- Sites of each tenant. Runs as sites_owner with search_path = sites.
--
-- tenant_id leads every key and index: a site_id is unique per tenant only (so one tenant
-- can never detect another's ids), and the table can later be distributed by tenant.

CREATE TABLE sites (
    tenant_id     text        NOT NULL CHECK (tenant_id ~ '^[a-z][a-z0-9_-]{2,49}$'),
    site_id       text        NOT NULL CHECK (site_id ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,49}$'),
    name          text        NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    -- NULL when the site has no location; otherwise the Location message as JSON.
    location      jsonb,
    region        text        GENERATED ALWAYS AS (location ->> 'region') STORED,
    configuration jsonb       NOT NULL DEFAULT '{}'::jsonb,
    create_time   timestamptz NOT NULL DEFAULT now(),
    update_time   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, site_id)
);

CREATE INDEX sites_by_region ON sites (tenant_id, region, site_id);

-- Idempotent creates: the first response for a (tenant, request_id) is kept and replayed.
CREATE TABLE create_requests (
    tenant_id    text        NOT NULL,
    request_id   text        NOT NULL,
    -- SHA-256 of the request, so a reused request_id with a different body is refused.
    request_hash text        NOT NULL,
    -- The serialized Site the first request returned.
    response     bytea       NOT NULL,
    create_time  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, request_id)
);

ALTER TABLE sites ENABLE ROW LEVEL SECURITY;
ALTER TABLE sites FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON sites
    USING (tenant_id = current_setting('app.current_tenant_id', true))
    WITH CHECK (tenant_id = current_setting('app.current_tenant_id', true));

ALTER TABLE create_requests ENABLE ROW LEVEL SECURITY;
ALTER TABLE create_requests FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON create_requests
    USING (tenant_id = current_setting('app.current_tenant_id', true))
    WITH CHECK (tenant_id = current_setting('app.current_tenant_id', true));

GRANT SELECT, INSERT, UPDATE, DELETE ON sites TO sites_app;
GRANT SELECT, INSERT, DELETE ON create_requests TO sites_app;
