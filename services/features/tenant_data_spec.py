"""The feature gate's tenant data, as TenantDataService purges it at offboarding.

Nothing is copied by a tenant migration: the target tenant keeps its own plan and
overrides, which are commercial terms, not operational data.
"""

from __future__ import annotations

from services.runtime.tenant_data_service import TenantDataSpec

FEATURES_TENANT_DATA = TenantDataSpec(
    schema="features",
    copies={},
    # Overrides reference the tenant's plan row: children first.
    purge_tables=("feature_overrides", "limit_overrides", "tenant_plans"),
)
