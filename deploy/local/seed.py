"""Demo data for ``make run``, written through the public API.

Each create carries a fixed ``request_id``, so seeding again after a restart changes
nothing: the service replays the first result.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from google.protobuf import struct_pb2
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb
from towerco.tenant.v1 import tenant_registry_service_pb2_grpc as tenant_grpc

from .tokens import mint

DEMO_TENANTS: dict[str, tuple[str, str, list[str]]] = {
    "tenant_a": ("Acme Towers ZA", "enterprise", ["aiops.acme-towers.example"]),
    "tenant_b": ("Savanna Telecom KE", "professional", []),
}

DEMO_SITES: dict[str, list[tuple[str, str, float, float, str, str]]] = {
    "tenant_a": [
        ("TWR-A-0001", "Johannesburg North Rooftop", -26.1076, 28.0567, "gauteng", "ZA"),
        ("TWR-A-0002", "Pretoria East Monopole", -25.7545, 28.2314, "gauteng", "ZA"),
        ("TWR-A-0003", "Cape Town Harbour Lattice", -33.9036, 18.4207, "western-cape", "ZA"),
    ],
    "tenant_b": [
        ("TWR-B-0001", "Nairobi CBD Rooftop", -1.2864, 36.8172, "nairobi", "KE"),
        ("TWR-B-0002", "Mombasa Coast Guyed Mast", -4.0435, 39.6682, "coast", "KE"),
    ],
}


def provision(
    stub: tenant_grpc.TenantRegistryServiceStub,
    token: str,
    tenant_id: str,
    display_name: str = "",
    plan: str = "enterprise",
    domains: list[str] | None = None,
) -> tenant_pb.Tenant:
    """Create ``tenant_id`` as a platform admin, idempotently (a fixed ``request_id``)."""
    result: tenant_pb.Tenant = stub.CreateTenant(
        tenant_pb.CreateTenantRequest(
            tenant_id=tenant_id,
            request_id=f"seed-tenant-{tenant_id}",
            tenant=tenant_pb.Tenant(
                display_name=display_name or tenant_id,
                plan=plan,
                admin_email="admin@operator.example",
                domains=domains or [],
            ),
        ),
        metadata=(("authorization", f"Bearer {token}"),),
        timeout=10,
    )
    return result


def seed_tenants(keys_dir: Path, tenant_port: int) -> int:
    """Create the demo tenants (idempotently); returns how many are in place."""
    token = mint(keys_dir, role="platform_admin", ttl=300, subject="seed")
    with grpc.insecure_channel(f"127.0.0.1:{tenant_port}") as channel:
        stub = tenant_grpc.TenantRegistryServiceStub(channel)
        for tenant_id, (name, plan, domains) in DEMO_TENANTS.items():
            provision(stub, token, tenant_id, name, plan, domains)
    return len(DEMO_TENANTS)


def seed_sites(keys_dir: Path, sites_port: int) -> int:
    """Create the demo sites (idempotently); returns how many are in place."""
    count = 0
    with grpc.insecure_channel(f"127.0.0.1:{sites_port}") as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        for tenant, rows in DEMO_SITES.items():
            token = mint(keys_dir, tenant=tenant, role="admin", ttl=300, subject="seed")
            for site_id, name, lat, lng, region, country in rows:
                configuration = struct_pb2.Struct()
                configuration.update({"tower_type": name.rsplit(" ", 1)[-1].lower(), "height_m": 30})
                stub.CreateSite(
                    sites_pb.CreateSiteRequest(
                        site_id=site_id,
                        request_id=f"seed-{site_id}",
                        site=sites_pb.Site(
                            name=name,
                            location=sites_pb.Location(
                                latitude=lat, longitude=lng, region=region, country_code=country
                            ),
                            configuration=configuration,
                        ),
                    ),
                    metadata=(("authorization", f"Bearer {token}"),),
                    timeout=10,
                )
                count += 1
    return count
