"""SQL of the tenant registry. Every statement filters on tenant_id; RLS is the net."""

from __future__ import annotations

from services.runtime.idempotency_purge import Records

TENANT_COLUMNS = (
    "tenant_id, display_name, state, plan, admin_email, suspend_reason, legal_hold, legal_hold_reason, version, "
    "request_id, request_hash, cell, "
    "create_time, update_time, "
    "ARRAY(SELECT h.host FROM tenant.host_routes h WHERE h.tenant_id = t.tenant_id ORDER BY h.host) AS domains"
)

GET_TENANT = f"SELECT {TENANT_COLUMNS} FROM tenant.tenants t WHERE tenant_id = $1"
GET_TENANT_FOR_UPDATE = GET_TENANT + " FOR UPDATE"

# Whether a create of $1 (its create_time) is older than the idempotency window ($2, seconds).
REQUEST_EXPIRED = "SELECT $1::timestamptz < now() - make_interval(secs => $2)"

# CreateTenant's idempotency record is the tenant's own row: expired, its request_id and hash
# are cleared. Not while PROVISIONING: a retry with its request_id is how provisioning finishes.
# One row per tenant, so the batch bound ($3) is always met.
_EXPIRED_REQUEST = (
    "request_id IS NOT NULL AND state <> 'STATE_PROVISIONING' AND create_time < now() - make_interval(secs => {})"
)
TENANT_REQUESTS = Records(
    table="tenant.tenants",
    tenants_sql="SELECT tenant_id FROM tenant.tenants WHERE " + _EXPIRED_REQUEST.format("$1"),
    purge_sql="UPDATE tenant.tenants SET request_id = NULL, request_hash = NULL "
    "WHERE tenant_id = $1 AND $3::int > 0 AND " + _EXPIRED_REQUEST.format("$2"),
)

INSERT_TENANT = """
INSERT INTO tenant.tenants (tenant_id, display_name, state, plan, admin_email, request_id, request_hash, cell)
VALUES ($1, $2, 'STATE_PROVISIONING', $3, $4, $5, $6, $7)
"""
# How many tenants each cell holds (NULL: the home cell, $1), deleted ones aside: where a new one has most room.
TENANTS_PER_CELL = """
SELECT coalesce(cell, $1) AS cell, count(*) AS tenants FROM tenant.tenants WHERE state <> 'STATE_DELETED' GROUP BY 1
"""

INSERT_HOST = "INSERT INTO tenant.host_routes (host, tenant_id) VALUES ($2, $1)"
DELETE_HOSTS = "DELETE FROM tenant.host_routes WHERE tenant_id = $1"
DELETE_HOST = "DELETE FROM tenant.host_routes WHERE tenant_id = $1 AND host = $2"
#: Every custom domain after $1, by host, but those of the tenants $3 (the gateway's map; a platform read).
LIST_HOSTS = """
SELECT host, tenant_id FROM tenant.host_routes WHERE host > $1 AND tenant_id <> ALL($3::text[]) ORDER BY host LIMIT $2
"""

INSERT_SETTINGS = "INSERT INTO tenant.tenant_settings (tenant_id, document) VALUES ($1, $2)"
GET_SETTINGS = "SELECT document FROM tenant.tenant_settings WHERE tenant_id = $1"
GET_SETTINGS_FOR_UPDATE = GET_SETTINGS + " FOR UPDATE"
UPSERT_SETTINGS = """
INSERT INTO tenant.tenant_settings (tenant_id, document) VALUES ($1, $2)
ON CONFLICT (tenant_id) DO UPDATE SET document = EXCLUDED.document, update_time = now()
"""
DELETE_SETTINGS = "DELETE FROM tenant.tenant_settings WHERE tenant_id = $1"

INSERT_USER = "INSERT INTO tenant.tenant_users (tenant_id, user_id, email, role) VALUES ($1, $2, $3, $4)"
DELETE_USERS = "DELETE FROM tenant.tenant_users WHERE tenant_id = $1"
#: The users a tenant holds now, against its max_users (HeldResourcesService).
COUNT_USERS = "SELECT count(*) FROM tenant.tenant_users WHERE tenant_id = $1"

# Every change of a tenant's record or settings bumps its version (the caches' order).
SET_STATE = f"""
WITH updated AS (
    UPDATE tenant.tenants SET state = $2, suspend_reason = $3, version = version + 1, update_time = now()
    WHERE tenant_id = $1 RETURNING *
)
SELECT {TENANT_COLUMNS.replace("t.tenant_id", "updated.tenant_id")} FROM updated
"""
SET_LEGAL_HOLD = f"""
WITH updated AS (
    UPDATE tenant.tenants SET legal_hold = $2, legal_hold_reason = $3, version = version + 1, update_time = now()
    WHERE tenant_id = $1 RETURNING *
)
SELECT {TENANT_COLUMNS.replace("t.tenant_id", "updated.tenant_id")} FROM updated
"""
#: A change of the tenant's record outside its own columns (its domains): a new version and update_time.
TOUCH_TENANT = f"""
WITH updated AS (
    UPDATE tenant.tenants SET version = version + 1, update_time = now() WHERE tenant_id = $1 RETURNING *
)
SELECT {TENANT_COLUMNS.replace("t.tenant_id", "updated.tenant_id")} FROM updated
"""
BUMP_VERSION = """
UPDATE tenant.tenants SET version = version + 1, update_time = now() WHERE tenant_id = $1 RETURNING version
"""

LIST_TENANTS = f"""
SELECT {TENANT_COLUMNS} FROM tenant.tenants t
WHERE tenant_id > $1 AND ($2 OR state <> 'STATE_DELETED') AND tenant_id <> ALL($4::text[])
ORDER BY tenant_id LIMIT $3
"""
TENANTS_IN_STATE = "SELECT tenant_id FROM tenant.tenants WHERE state = $1 ORDER BY tenant_id"
FIND_HOST = "SELECT tenant_id FROM tenant.host_routes WHERE host = $1"

MIGRATION_COLUMNS = (
    "migration_id, source_tenant_id, target_tenant_id, data_types, state, error, request_id, request_hash, "
    "create_time, update_time"
)
INSERT_MIGRATION = f"""
INSERT INTO tenant.migrations (tenant_id, migration_id, source_tenant_id, target_tenant_id, data_types, state,
                               request_id, request_hash)
VALUES ($1, $2, $3, $4, $5, 'STATE_PENDING', $6, $7)
ON CONFLICT (tenant_id, request_id) DO NOTHING
RETURNING {MIGRATION_COLUMNS}
"""
GET_MIGRATION = f"SELECT {MIGRATION_COLUMNS} FROM tenant.migrations WHERE tenant_id = $1 AND migration_id = $2"
GET_MIGRATION_BY_REQUEST = f"SELECT {MIGRATION_COLUMNS} FROM tenant.migrations WHERE tenant_id = $1 AND request_id = $2"
SET_MIGRATION_STATE = f"""
UPDATE tenant.migrations SET state = $3, error = $4, update_time = now(),
    lease_until = CASE WHEN $3 IN ('STATE_PENDING', 'STATE_RUNNING') THEN lease_until END
WHERE tenant_id = $1 AND migration_id = $2 RETURNING {MIGRATION_COLUMNS}
"""
# Claim (or renew) an unfinished migration for this process, unless another holds it.
CLAIM_MIGRATION = f"""
UPDATE tenant.migrations SET lease_owner = $3, lease_until = now() + make_interval(secs => $4)
WHERE tenant_id = $1 AND migration_id = $2 AND state IN ('STATE_PENDING', 'STATE_RUNNING')
  AND (lease_until IS NULL OR lease_until < now() OR lease_owner = $3)
RETURNING {MIGRATION_COLUMNS}
"""
UNFINISHED_MIGRATIONS = """
SELECT migration_id FROM tenant.migrations
WHERE tenant_id = $1 AND state IN ('STATE_PENDING', 'STATE_RUNNING') ORDER BY create_time
"""

INSERT_SETTINGS_BACKUP = """
INSERT INTO tenant.migration_settings_backup (tenant_id, migration_id, document) VALUES ($1, $2, $3)
ON CONFLICT (tenant_id, migration_id) DO NOTHING
"""
GET_SETTINGS_BACKUP = "SELECT document FROM tenant.migration_settings_backup WHERE tenant_id = $1 AND migration_id = $2"
DELETE_SETTINGS_BACKUP = "DELETE FROM tenant.migration_settings_backup WHERE tenant_id = $1 AND migration_id = $2"
DELETE_SETTINGS_BACKUPS = "DELETE FROM tenant.migration_settings_backup WHERE tenant_id = $1"

# ---- Users and custom roles (UserService, services/tenant/users.py) ----------------------

USER_COLUMNS = "user_id, email, role, state, create_time, update_time"
#: Every change of a tenant's users or roles bumps its version, which is what the caches
#: order users' access by; the row lock also makes a tenant's user changes one at a time
#: (max_users counted exactly under concurrent creates).
BUMP_VERSION_FOR_USERS = f"""
WITH updated AS (
    UPDATE tenant.tenants SET version = version + 1 WHERE tenant_id = $1 RETURNING *
)
SELECT {TENANT_COLUMNS.replace("t.tenant_id", "updated.tenant_id")} FROM updated
"""
TENANT_VERSION = "SELECT version FROM tenant.tenants WHERE tenant_id = $1"
INSERT_NEW_USER = f"""
INSERT INTO tenant.tenant_users (tenant_id, user_id, email, role, request_id, request_hash)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (tenant_id, email) DO NOTHING
RETURNING {USER_COLUMNS}
"""
GET_USER = f"SELECT {USER_COLUMNS} FROM tenant.tenant_users WHERE tenant_id = $1 AND user_id = $2"
GET_USER_BY_EMAIL = f"SELECT {USER_COLUMNS} FROM tenant.tenant_users WHERE tenant_id = $1 AND email = $2"
GET_USER_BY_REQUEST = f"""
SELECT {USER_COLUMNS}, request_hash FROM tenant.tenant_users WHERE tenant_id = $1 AND request_id = $2
"""
LIST_USERS = f"""
SELECT {USER_COLUMNS} FROM tenant.tenant_users WHERE tenant_id = $1 AND user_id > $2 ORDER BY user_id LIMIT $3
"""
SET_USER_ROLE = f"""
UPDATE tenant.tenant_users SET role = $3, update_time = now() WHERE tenant_id = $1 AND user_id = $2
RETURNING {USER_COLUMNS}
"""
SET_USER_STATE = f"""
UPDATE tenant.tenant_users SET state = $3, update_time = now() WHERE tenant_id = $1 AND user_id = $2
RETURNING {USER_COLUMNS}
"""
DELETE_USER = "DELETE FROM tenant.tenant_users WHERE tenant_id = $1 AND user_id = $2"
#: A user's access: its state, role, and the permissions of its role if that is a custom one.
GET_USER_ACCESS = """
SELECT u.state, u.role, r.permissions AS custom
FROM tenant.tenant_users u
LEFT JOIN tenant.tenant_roles r ON r.tenant_id = u.tenant_id AND r.role_id = u.role
WHERE u.tenant_id = $1 AND u.user_id = $2
"""

ROLE_COLUMNS = "role_id, permissions"
GET_ROLE = f"SELECT {ROLE_COLUMNS} FROM tenant.tenant_roles WHERE tenant_id = $1 AND role_id = $2"
INSERT_ROLE = f"""
INSERT INTO tenant.tenant_roles (tenant_id, role_id, permissions) VALUES ($1, $2, $3)
ON CONFLICT (tenant_id, role_id) DO NOTHING
RETURNING {ROLE_COLUMNS}
"""
SET_ROLE_PERMISSIONS = f"""
UPDATE tenant.tenant_roles SET permissions = $3, update_time = now() WHERE tenant_id = $1 AND role_id = $2
RETURNING {ROLE_COLUMNS}
"""
LIST_ROLES = f"""
SELECT {ROLE_COLUMNS} FROM tenant.tenant_roles WHERE tenant_id = $1 AND role_id > $2 ORDER BY role_id LIMIT $3
"""
DELETE_ROLE = "DELETE FROM tenant.tenant_roles WHERE tenant_id = $1 AND role_id = $2"
COUNT_ROLE_USERS = "SELECT count(*) FROM tenant.tenant_users WHERE tenant_id = $1 AND role = $2"
DELETE_ROLES = "DELETE FROM tenant.tenant_roles WHERE tenant_id = $1"
