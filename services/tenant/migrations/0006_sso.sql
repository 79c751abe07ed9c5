-- Single sign-on (SsoConfigService): each tenant's OpenID Connect identity provider.
--
-- `issuer` is unique platform-wide: one issuer signs in for one tenant, so a token's
-- issuer names its tenant. Services look an issuer up across tenants (the registry's
-- LookupSsoIssuer, through platform_read), which is why the table has that policy like
-- host_routes; every other access is bound to the tenant as usual.
CREATE TABLE tenant_sso (
    tenant_id    text        NOT NULL REFERENCES tenants (tenant_id),
    issuer       text        NOT NULL UNIQUE CHECK (length(issuer) BETWEEN 1 AND 512),
    audience     text        NOT NULL CHECK (length(audience) BETWEEN 1 AND 256),
    email_claim  text        NOT NULL,
    groups_claim text        NOT NULL,
    -- [[group, role], ...] in the configuration's order.
    group_roles  jsonb       NOT NULL,
    update_time  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id)
);
SELECT platform_meta.isolate_by_tenant('tenant_sso');
CREATE POLICY platform_read ON tenant_sso FOR SELECT
    USING (current_setting('app.platform_read', true) = 'on');
GRANT SELECT, INSERT, UPDATE, DELETE ON tenant_sso TO tenant_app;
