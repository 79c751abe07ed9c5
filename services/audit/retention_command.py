"""``python -m services.audit retention``: one round of the retention job, then exit (the cluster's CronJob).

It reads each tenant's period from the feature gate and its legal hold from the tenant
registry directly (no cache: one look-up of each per tenant, once a run), as the audit
service, and deletes from ``AUDIT_RETENTION_DATABASE_URL``.
"""

from __future__ import annotations

import logging

from services.runtime import logs
from services.runtime.entitlements import Entitlements, FeatureGateSource, Record, evaluate
from services.runtime.identity import ServiceIdentity
from services.runtime.plans import load_plans
from services.runtime.settings import SettingsError, load
from services.runtime.tenants import RegistryStateSource, TenantInfo

from .retention_job import RetentionJob, held_in

log = logging.getLogger("towerco.audit.retention")


async def run_retention_once() -> None:
    settings = load("audit")
    logs.configure("audit", settings.log_level, settings.log_format)
    if not settings.audit_retention_database_url:
        raise SettingsError("AUDIT_RETENTION_DATABASE_URL must be set to run the retention job")
    plans = load_plans(settings.plans_file)
    identity = ServiceIdentity.from_file(
        "audit",
        issuer=settings.service_jwt_issuer,
        audience=settings.jwt_audience,
        key_file=settings.service_key_file,
        kid=settings.service_key_id,
    )
    source = FeatureGateSource(settings.targets["features"], identity, timeout=10.0)
    registry = RegistryStateSource(settings.targets["tenant"], identity, timeout=10.0)

    async def tenant_state(tenant_id: str) -> TenantInfo | None:
        return TenantInfo.from_value(tenant_id, await registry(tenant_id))

    async def entitlements(tenant_id: str) -> Entitlements | None:
        found = await source(tenant_id)
        if found.value is None:
            return None
        return evaluate(plans, tenant_id, Record.from_value(found.value))

    job = RetentionJob(
        settings.audit_retention_database_url, entitlements, held_in(tenant_state),
        settings.audit_retention_interval_seconds, settings.audit_retention_batch_size,
        list(settings.audit_retention_cell_database_urls.values()),
    )  # fmt: skip
    try:
        removed = await job.run_once()
    finally:
        await source.close()
        await registry.close()
    log.info("audit retention: removed %d events of %d tenants", sum(removed.values()), len(removed))
