-- Tombstones expire: a tenant row in STATE_DELETED is removed TENANT_TOMBSTONE_DAYS after its
-- last change (services/tenant/tombstones.py), bound to that tenant like any write. The
-- runtime role may delete a tenant row, and only a deleted tenant's: a restrictive policy.
GRANT DELETE ON tenants TO tenant_app;
CREATE POLICY only_tombstones_deleted ON tenants AS RESTRICTIVE FOR DELETE
    USING (state = 'STATE_DELETED');
