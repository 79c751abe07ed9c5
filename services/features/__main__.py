"""``python -m services.features``: run the feature gate."""

from __future__ import annotations

from pathlib import Path

from grpc import aio
from towerco.features.v1 import feature_gate_service_pb2, feature_gate_service_pb2_grpc
from towerco.internal.v1 import (
    entitlements_pb2,
    entitlements_pb2_grpc,
    tenant_data_pb2,
    tenant_data_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)

from services.runtime.server import Runtime, ServiceSpec, main
from services.runtime.tenant_data_service import TenantDataServicer

from .canary_sentinels import FEATURES_SENTINELS
from .records import record_source
from .registration import TenantEntitlementsServicer
from .servicer import FeatureGateServicer
from .tenant_data_spec import FEATURES_TENANT_DATA
from .usage_recording import TenantUsageServicer, local_sink
from .usage_retention import start_usage_retention


def register(server: aio.Server, runtime: Runtime) -> None:
    feature_gate_service_pb2_grpc.add_FeatureGateServiceServicer_to_server(FeatureGateServicer(runtime), server)
    entitlements_pb2_grpc.add_TenantEntitlementsServiceServicer_to_server(
        TenantEntitlementsServicer(runtime, record_source(runtime.db)), server
    )
    tenant_data_pb2_grpc.add_TenantDataServiceServicer_to_server(
        TenantDataServicer(runtime, FEATURES_TENANT_DATA), server
    )
    usage_pb2_grpc.add_TenantUsageServiceServicer_to_server(TenantUsageServicer(runtime), server)
    start_usage_retention(runtime)


SPEC = ServiceSpec(
    name="features",
    schema="features",
    services=(
        feature_gate_service_pb2.DESCRIPTOR.services_by_name["FeatureGateService"],
        entitlements_pb2.DESCRIPTOR.services_by_name["TenantEntitlementsService"],
        tenant_data_pb2.DESCRIPTOR.services_by_name["TenantDataService"],
        usage_pb2.DESCRIPTOR.services_by_name["TenantUsageService"],
    ),
    migrations_dir=Path(__file__).parent / "migrations",
    register=register,
    sentinels=FEATURES_SENTINELS,
    entitlement_source=record_source,
    components=("tenant_data",),
    usage_sink=lambda runtime: local_sink(runtime.db, runtime.faults),
)

if __name__ == "__main__":
    main(SPEC)
