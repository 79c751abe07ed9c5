"""Calls the tests make the same way in several files: one definition each."""

from __future__ import annotations

import uuid
from typing import Any

from towerco.features.v1 import feature_gate_service_pb2 as features_pb
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb

from .metadata import Metadata, bearer


def create_site(sites: Any, md: Metadata, site_id: str, *, name: str = "", timeout: float = 10) -> sites_pb.Site:
    """CreateSite of ``site_id`` named ``name`` (default ``Site <id>``) as the caller of ``md``."""
    request = sites_pb.CreateSiteRequest(site_id=site_id, site=sites_pb.Site(name=name or f"Site {site_id}"))
    site: sites_pb.Site = sites.CreateSite(request, metadata=md, timeout=timeout)
    return site


def get_tenant(registry: Any, platform_token: str, tenant_id: str) -> tenant_pb.Tenant:
    """GetTenant as the platform admin."""
    tenant: tenant_pb.Tenant = registry.GetTenant(
        tenant_pb.GetTenantRequest(tenant_id=tenant_id), metadata=bearer(platform_token), timeout=10
    )
    return tenant


def set_limit(features: Any, platform_token: str, tenant: str, resource: str, limit: int) -> None:
    """SetLimitOverride of ``tenant``'s ``resource`` as the platform admin."""
    features.SetLimitOverride(
        features_pb.SetLimitOverrideRequest(tenant_id=tenant, resource=resource, limit=limit),
        metadata=bearer(platform_token),
        timeout=10,
    )


def create_tenant(registry: Any, platform_token: str, prefix: str = "t", **fields: Any) -> str:
    """CreateTenant of a fresh ``<prefix>_<random>`` by the platform admin; its id, once ACTIVE.

    ``fields`` are the Tenant's (display_name, plan, admin_email and domains have defaults).
    """
    tenant_id = f"{prefix}_{uuid.uuid4().hex[:10]}"
    tenant = tenant_pb.Tenant(
        display_name=fields.pop("display_name", f"Operator {tenant_id}"),
        plan=fields.pop("plan", "professional"),
        admin_email=fields.pop("admin_email", f"noc@{tenant_id.replace('_', '-')}.example"),
        **fields,
    )
    created = registry.CreateTenant(
        tenant_pb.CreateTenantRequest(tenant_id=tenant_id, tenant=tenant, request_id=f"new-{tenant_id}"),
        metadata=bearer(platform_token),
        timeout=10,
    )
    assert created.state == tenant_pb.Tenant.STATE_ACTIVE, created
    return tenant_id
