"""The tenant registry's rows of the isolation canaries (``services/runtime/canary.py``).

One INSERT per tenant table of the schema, ``$1`` being the canary tenant. The tenant
record comes first (the other tables reference it): SUSPENDED, so that no call is ever
served as a canary; ListTenants leaves the canaries out.
"""

from __future__ import annotations

TENANT_SENTINELS = {
    "tenants": "INSERT INTO {schema}.tenants (tenant_id, display_name, state, plan, admin_email, suspend_reason) "
    "VALUES ($1, 'Isolation canary', 'STATE_SUSPENDED', 'basic', 'isolation-canary@towerco.invalid', "
    "'reserved for the isolation canary: serves no calls') ON CONFLICT DO NOTHING",
    "host_routes": "INSERT INTO {schema}.host_routes (host, tenant_id) "
    "VALUES (replace($1, '_', '-') || '.isolation-canary.invalid', $1) ON CONFLICT DO NOTHING",
    "tenant_settings": "INSERT INTO {schema}.tenant_settings (tenant_id, document) "
    "VALUES ($1, '{{}}'::jsonb) ON CONFLICT DO NOTHING",
    "tenant_users": "INSERT INTO {schema}.tenant_users (tenant_id, user_id, email, role) "
    "VALUES ($1, 'isolation-canary', 'isolation-canary@towerco.invalid', 'viewer') ON CONFLICT DO NOTHING",
    "tenant_roles": "INSERT INTO {schema}.tenant_roles (tenant_id, role_id, permissions) "
    "VALUES ($1, 'isolation-canary', '{{sites.read}}') ON CONFLICT DO NOTHING",
    "migrations": "INSERT INTO {schema}.migrations "
    "(tenant_id, migration_id, source_tenant_id, target_tenant_id, data_types, state) "
    "VALUES ($1, '00000000-0000-4000-8000-00000000ca11', $1, $1, '{{}}', 'STATE_SUCCEEDED') ON CONFLICT DO NOTHING",
    "migration_settings_backup": "INSERT INTO {schema}.migration_settings_backup (tenant_id, migration_id, document) "
    "VALUES ($1, '00000000-0000-4000-8000-00000000ca11', '{{}}'::jsonb) ON CONFLICT DO NOTHING",
    "tenant_sso": "INSERT INTO {schema}.tenant_sso "
    "(tenant_id, issuer, audience, email_claim, groups_claim, group_roles) "
    "VALUES ($1, 'https://' || replace($1, '_', '-') || '.isolation-canary.invalid', 'isolation-canary', 'email', "
    "'groups', '[]'::jsonb) ON CONFLICT DO NOTHING",
    "tenant_moves": "INSERT INTO {schema}.tenant_moves "
    "(tenant_id, move_id, request_id, source_cell, target_cell, stage) "
    "VALUES ($1, '00000000-0000-4000-8000-00000000ca11', 'isolation-canary', 'cell1', 'cell1', 'DONE') "
    "ON CONFLICT DO NOTHING",
}
