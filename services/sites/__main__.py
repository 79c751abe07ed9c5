"""``python -m services.sites``: run the sites service."""

from __future__ import annotations

from pathlib import Path

from grpc import aio
from towerco.internal.v1 import held_resources_pb2, held_resources_pb2_grpc, tenant_data_pb2, tenant_data_pb2_grpc
from towerco.sites.v1 import sites_service_pb2, sites_service_pb2_grpc

from services.runtime.held_resources import HeldResourcesServicer
from services.runtime.idempotency_purge import IdempotencyPurge, request_table
from services.runtime.server import Runtime, ServiceSpec, main
from services.runtime.tenant_data_service import TenantDataServicer

from . import queries
from .canary_sentinels import SITES_SENTINELS
from .servicer import SiteServicer
from .tenant_data_spec import SITES_TENANT_DATA


def register(server: aio.Server, runtime: Runtime) -> None:
    sites_service_pb2_grpc.add_SiteServiceServicer_to_server(SiteServicer(runtime), server)
    tenant_data_pb2_grpc.add_TenantDataServiceServicer_to_server(TenantDataServicer(runtime, SITES_TENANT_DATA), server)
    held_resources_pb2_grpc.add_HeldResourcesServiceServicer_to_server(
        HeldResourcesServicer(runtime, {"max_sites": queries.COUNT_SITES}), server
    )
    settings = runtime.settings
    purge = IdempotencyPurge(
        runtime.db,
        request_table("sites.create_requests"),
        settings.idempotency_window_seconds,
        settings.idempotency_purge_interval_seconds,
    )
    runtime.on_start(purge.start)
    runtime.on_stop(purge.close)


SPEC = ServiceSpec(
    name="sites",
    schema="sites",
    services=(
        sites_service_pb2.DESCRIPTOR.services_by_name["SiteService"],
        tenant_data_pb2.DESCRIPTOR.services_by_name["TenantDataService"],
        held_resources_pb2.DESCRIPTOR.services_by_name["HeldResourcesService"],
    ),
    migrations_dir=Path(__file__).parent / "migrations",
    register=register,
    sentinels=SITES_SENTINELS,
)

if __name__ == "__main__":
    main(SPEC)
