"""The feature gate's tenant data, as TenantDataService purges it at offboarding.

Nothing is copied by a tenant migration: the target tenant keeps its own plan and
overrides, which are commercial terms, not operational data.

Usage records are not purged with the tenant: billing needs them after offboarding (the
last month's invoice, disputes). ``usage_hourly`` is kept for the retention period the
README's Usage metering section states (``USAGE_RETENTION_DAYS``), and removed then by the
retention task (``usage_retention.py``), like every other tenant's old hours; ``usage_flushes``
only guards retried flushes and goes the same way after ``USAGE_FLUSH_RECORD_DAYS``.
"""

from __future__ import annotations

from services.runtime.tenant_data_service import TenantDataSpec

#: Tables a purge leaves alone on purpose (see the module's docstring).
KEPT_AFTER_OFFBOARDING = ("audit_outbox", "usage_hourly", "usage_flushes")

FEATURES_TENANT_DATA = TenantDataSpec(
    schema="features",
    copies={},
    # Overrides reference the tenant's plan row: children first.
    purge_tables=("feature_overrides", "limit_overrides", "tenant_plans"),
    kept_tables=KEPT_AFTER_OFFBOARDING,
)
