"""Sites service: a tenant's tower sites (towerco.sites.v1.SiteService, port 50052)."""
