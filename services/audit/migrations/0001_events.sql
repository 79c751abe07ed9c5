-- The audit log. Runs as audit_owner with search_path = audit.
--
-- One hash chain per tenant (see services/audit/chain.py): `sequence` counts 1, 2, 3, ...
-- without gaps, and each event's `hash` covers its fields and `prev_hash`, the hash of
-- the event before it. The service appends under a per-tenant advisory lock, so
-- concurrent writers for one tenant still make one chain.
--
-- Append-only: the runtime role may INSERT and SELECT only, and a trigger refuses every
-- UPDATE, DELETE and TRUNCATE, whoever runs it (the owner and superusers included, and
-- in session_replication_role = replica too: the triggers are ENABLE ALWAYS). The one
-- exception is the retention purge: DELETE run as the NOLOGIN role audit_retention
-- (services/audit/retention.py makes it and grants it what it needs).

CREATE TABLE events (
    tenant_id   text        NOT NULL CHECK (tenant_id ~ '^[a-z][a-z0-9_-]{2,49}$'),
    sequence    bigint      NOT NULL CHECK (sequence >= 1),
    event_id    uuid        NOT NULL,
    user_id     text        NOT NULL CHECK (length(user_id) <= 128),
    action      text        NOT NULL CHECK (length(action) BETWEEN 1 AND 256),
    resource    text        NOT NULL CHECK (length(resource) <= 256),
    -- A JSON object (the AuditEvent's `details` Struct); '{}' when it had none.
    details     jsonb       NOT NULL CHECK (jsonb_typeof(details) = 'object'),
    -- The normalized text form of an IPv4/IPv6 address, or ''.
    ip_address  text        NOT NULL,
    request_id  text        NOT NULL CHECK (length(request_id) <= 128),
    -- A canonical gRPC status code name.
    outcome     text        NOT NULL CHECK (outcome ~ '^[A-Z_]{2,32}$'),
    -- When the action happened (the caller's time, else when the service received it).
    create_time timestamptz NOT NULL,
    -- Lower-case hex SHA-256; prev_hash is '' exactly for the tenant's first event.
    prev_hash   text        NOT NULL CHECK (prev_hash = '' OR prev_hash ~ '^[0-9a-f]{64}$'),
    hash        text        NOT NULL CHECK (hash ~ '^[0-9a-f]{64}$'),
    CHECK ((sequence = 1) = (prev_hash = '')),
    PRIMARY KEY (tenant_id, sequence),
    -- Idempotent writes: an event_id is written once per tenant.
    UNIQUE (tenant_id, event_id)
);

-- ListEvents' filters, each newest first within the tenant; the time range is served by
-- events_by_time (and the retention purge uses it too).
CREATE INDEX events_by_action ON events (tenant_id, action, sequence);
CREATE INDEX events_by_resource ON events (tenant_id, resource, sequence);
CREATE INDEX events_by_user ON events (tenant_id, user_id, sequence);
CREATE INDEX events_by_time ON events (tenant_id, create_time);

SELECT platform_meta.isolate_by_tenant('events');
-- The retention purge crosses tenants: it reads and deletes every tenant's old events,
-- and only as the retention role (a NOLOGIN role no runtime role is a member of).
CREATE POLICY retention_read ON events FOR SELECT
    USING (current_user = 'audit_retention');
CREATE POLICY retention_delete ON events FOR DELETE
    USING (current_user = 'audit_retention');

GRANT SELECT, INSERT ON events TO audit_app;

-- Append-only, for everyone: UPDATE never, DELETE only as audit_retention.
CREATE FUNCTION refuse_event_change() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_user = 'audit_retention' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit events are append-only: % on audit.events is refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'old events are removed only by the retention purge, run as audit_retention';
END
$$;

CREATE FUNCTION refuse_event_truncate() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'audit events are append-only: TRUNCATE on audit.events is refused'
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION refuse_event_change();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_event_truncate();
-- ALWAYS: they fire in session_replication_role = replica as well.
ALTER TABLE events ENABLE ALWAYS TRIGGER events_append_only;
ALTER TABLE events ENABLE ALWAYS TRIGGER events_no_truncate;

-- The retention purge (services/audit/retention.py): for each tenant (or only `only_tenant`),
-- deletes the oldest events up to, not including, the first one created at or after
-- `cutoff`, and never the newest, so what remains is an unbroken tail of the chain and
-- sequences never restart. SECURITY INVOKER: it deletes as its caller, which only
-- audit_retention may do.
CREATE FUNCTION purge_events(cutoff timestamptz, only_tenant text DEFAULT NULL) RETURNS bigint
    LANGUAGE sql SECURITY INVOKER SET search_path = pg_catalog, pg_temp
AS $$
    WITH bounds AS (
        SELECT tenant_id,
               coalesce(min(sequence) FILTER (WHERE create_time >= cutoff), max(sequence)) AS keep_from
        FROM audit.events
        WHERE only_tenant IS NULL OR tenant_id = only_tenant
        GROUP BY tenant_id
    ), purged AS (
        DELETE FROM audit.events e
        USING bounds b
        WHERE e.tenant_id = b.tenant_id AND e.sequence < b.keep_from
        RETURNING 1
    )
    SELECT count(*) FROM purged
$$;
REVOKE ALL ON FUNCTION purge_events(timestamptz, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION refuse_event_change() FROM PUBLIC;
REVOKE ALL ON FUNCTION refuse_event_truncate() FROM PUBLIC;
