"""Tenant registry: tenants, their settings and data moves (towerco.tenant.v1.TenantRegistryService, port 50051)."""
