"""The sites service's tenant data, as TenantDataService migrates and purges it."""

from __future__ import annotations

from services.runtime.tenant_data_service import CopySpec, TenantDataSpec

SITES_TENANT_DATA = TenantDataSpec(
    schema="sites",
    copies={
        # `region` is generated from `location`: the target recomputes it.
        "sites": CopySpec(
            table="sites",
            key=("site_id",),
            columns=("name", "location", "configuration", "create_time", "update_time"),
        ),
    },
    # create_requests are the source's own idempotency records: purged, never copied.
    purge_tables=("create_requests", "sites"),
)
