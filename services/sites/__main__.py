"""``python -m services.sites``: run the sites service."""

from __future__ import annotations

from pathlib import Path

from grpc import aio
from towerco.sites.v1 import sites_service_pb2, sites_service_pb2_grpc

from services.runtime.server import Runtime, ServiceSpec, main

from .servicer import SiteServicer


def register(server: aio.Server, runtime: Runtime) -> None:
    sites_service_pb2_grpc.add_SiteServiceServicer_to_server(SiteServicer(runtime), server)


SPEC = ServiceSpec(
    name="sites",
    schema="sites",
    services=(sites_service_pb2.DESCRIPTOR.services_by_name["SiteService"],),
    migrations_dir=Path(__file__).parent / "migrations",
    register=register,
)

if __name__ == "__main__":
    main(SPEC)
