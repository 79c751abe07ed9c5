"""Demo data for ``make run``, written through the public API.

The demo tenants are created once, the first time ``make run`` finds them missing. After
that they belong to whoever runs the platform: a demo tenant that exists is left exactly
as it is (suspended, moved to another plan, deleted), and its sites are only topped up
while it is active. Each create carries a fixed ``request_id``, so seeding an active
tenant again changes nothing: the service replays the first result. Seeding never stops
start-up: what it could not do is reported in its notes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import struct_pb2
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb
from towerco.tenant.v1 import tenant_registry_service_pb2_grpc as tenant_grpc

from services.runtime.tls import GrpcTls

from .tokens import mint


@dataclass(frozen=True)
class DemoSite:
    site_id: str
    name: str
    latitude: float
    longitude: float
    region: str
    country_code: str


@dataclass(frozen=True)
class DemoTenant:
    display_name: str
    plan: str
    domains: tuple[str, ...]
    sites: tuple[DemoSite, ...]


DEMO_TENANTS: dict[str, DemoTenant] = {
    "tenant_a": DemoTenant(
        "Acme Towers ZA",
        "enterprise",
        ("aiops.acme-towers.example",),
        (
            DemoSite("TWR-A-0001", "Johannesburg North Rooftop", -26.1076, 28.0567, "gauteng", "ZA"),
            DemoSite("TWR-A-0002", "Pretoria East Monopole", -25.7545, 28.2314, "gauteng", "ZA"),
            DemoSite("TWR-A-0003", "Cape Town Harbour Lattice", -33.9036, 18.4207, "western-cape", "ZA"),
        ),
    ),
    "tenant_b": DemoTenant(
        "Savanna Telecom KE",
        "professional",
        (),
        (
            DemoSite("TWR-B-0001", "Nairobi CBD Rooftop", -1.2864, 36.8172, "nairobi", "KE"),
            DemoSite("TWR-B-0002", "Mombasa Coast Guyed Mast", -4.0435, 39.6682, "coast", "KE"),
        ),
    ),
}


@dataclass
class SeedReport:
    """What seeding found and did: each demo tenant's state, the demo sites in place, what it left."""

    #: Tenant id -> state name (``STATE_ACTIVE`` ...), or ``"unknown"`` when it could not be read.
    states: dict[str, str] = field(default_factory=dict)
    sites: int = 0
    #: One line per thing seeding left alone or could not do, for the ``make run`` output.
    notes: list[str] = field(default_factory=list)


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


def seed_demo(
    keys_dir: Path,
    ports: Mapping[str, int],
    demo: Mapping[str, DemoTenant] = DEMO_TENANTS,
    tls: GrpcTls = GrpcTls(),  # noqa: B008 - frozen, plaintext
) -> SeedReport:
    """Create the missing demo tenants and the active ones' sites; leave every other demo tenant alone.

    ``ports`` names the services that run; without ``sites`` no site is seeded. ``tls``: how
    the services are called (over TLS when it names a CA).
    """
    report = SeedReport()
    token = mint(keys_dir, role="platform_admin", ttl=300, subject="seed")
    with tls.channel(f"127.0.0.1:{ports['tenant']}") as channel:
        registry = tenant_grpc.TenantRegistryServiceStub(channel)
        for tenant_id, tenant in demo.items():
            try:
                report.states[tenant_id] = _ensure_tenant(registry, token, tenant_id, tenant)
            except grpc.RpcError as exc:
                report.states[tenant_id] = "unknown"
                report.notes.append(f"demo tenant {tenant_id} not seeded: {_why(exc)}")
    for tenant_id, state in report.states.items():
        if state not in ("STATE_ACTIVE", "unknown"):
            report.notes.append(f"demo tenant {tenant_id} is {state}: left as it is, its sites not seeded")
    active = [tenant_id for tenant_id, state in report.states.items() if state == "STATE_ACTIVE"]
    if "sites" in ports:
        with tls.channel(f"127.0.0.1:{ports['sites']}") as channel:
            sites = sites_grpc.SiteServiceStub(channel)
            for tenant_id in active:
                try:
                    report.sites += _ensure_sites(sites, keys_dir, tenant_id, demo[tenant_id].sites)
                except grpc.RpcError as exc:
                    report.notes.append(f"demo sites of {tenant_id} not seeded: {_why(exc)}")
    return report


def _ensure_tenant(
    registry: tenant_grpc.TenantRegistryServiceStub, token: str, tenant_id: str, tenant: DemoTenant
) -> str:
    """The state of the demo tenant, created first if it does not exist (in any state)."""
    metadata = (("authorization", f"Bearer {token}"),)
    try:
        found: tenant_pb.Tenant = registry.GetTenant(
            tenant_pb.GetTenantRequest(tenant_id=tenant_id), metadata=metadata, timeout=10
        )
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        found = tenant_pb.Tenant(state=tenant_pb.Tenant.STATE_PROVISIONING)
    if found.state == tenant_pb.Tenant.STATE_PROVISIONING:
        # Missing, or a first start that stopped half-way: the same request_id finishes it.
        found = provision(registry, token, tenant_id, tenant.display_name, tenant.plan, list(tenant.domains))
    return tenant_pb.Tenant.State.Name(found.state)


def _ensure_sites(sites: sites_grpc.SiteServiceStub, keys_dir: Path, tenant_id: str, rows: tuple[DemoSite, ...]) -> int:
    token = mint(keys_dir, tenant=tenant_id, role="admin", ttl=300, subject="seed")
    for row in rows:
        configuration = struct_pb2.Struct()
        configuration.update({"tower_type": row.name.rsplit(" ", 1)[-1].lower(), "height_m": 30})
        sites.CreateSite(
            sites_pb.CreateSiteRequest(
                site_id=row.site_id,
                request_id=f"seed-{row.site_id}",
                site=sites_pb.Site(
                    name=row.name,
                    location=sites_pb.Location(
                        latitude=row.latitude, longitude=row.longitude, region=row.region, country_code=row.country_code
                    ),
                    configuration=configuration,
                ),
            ),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=10,
        )
    return len(rows)


def _why(exc: grpc.RpcError) -> str:
    call: grpc.Call = exc  # type: ignore[assignment]
    return f"{call.code().name}: {call.details()}"
