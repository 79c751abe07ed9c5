"""``python -m services.tenant``: run the tenant registry."""

from __future__ import annotations

from pathlib import Path

from grpc import aio
from towerco.internal.v1 import (
    entitlements_pb2,
    entitlements_pb2_grpc,
    held_resources_pb2,
    held_resources_pb2_grpc,
    tenant_data_pb2,
    tenant_data_pb2_grpc,
)
from towerco.tenant.v1 import (
    tenant_registry_service_pb2,
    tenant_registry_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)

from services.runtime.channels import service_channel
from services.runtime.held_resources import HeldResourcesServicer
from services.runtime.idempotency_purge import IdempotencyPurge
from services.runtime.server import Runtime, ServiceSpec, main

from . import queries, sso_config
from .canary_sentinels import TENANT_SENTINELS
from .custom_domains import CustomDomains
from .directory import TenantDirectoryServicer
from .offboarding import Offboarding
from .records import state_source, user_source
from .secrets import load_secret_box
from .servicer import TenantRegistryServicer
from .tenant_data_migration import MigrationRunner, Part, RemotePart, SettingsPart
from .tenant_move import TenantMover
from .tombstones import start_tombstone_purge
from .users import UserServicer

#: Who owns which data type that a migration can copy, besides the registry's `settings`.
REMOTE_DATA_TYPES = {"sites": "sites"}
#: Services whose rows of a tenant are purged at offboarding.
DATA_OWNERS = ("sites", "features")


def register(server: aio.Server, runtime: Runtime) -> None:
    box = load_secret_box()
    targets = runtime.settings.targets
    stubs = {
        name: tenant_data_pb2_grpc.TenantDataServiceStub(service_channel(targets[name], identity=runtime.identity))
        for name in sorted({*REMOTE_DATA_TYPES.values(), *DATA_OWNERS})
    }
    parts: dict[str, Part] = {
        "settings": SettingsPart(runtime.db, runtime.cache, box),
        **{data_type: RemotePart(data_type, stubs[owner]) for data_type, owner in REMOTE_DATA_TYPES.items()},
    }
    migrations = MigrationRunner(runtime.db, runtime.faults, parts, runtime.audit)
    offboarding = Offboarding(runtime.db, runtime.cache, {name: stubs[name] for name in DATA_OWNERS})
    mover = TenantMover(
        runtime.db,
        runtime.cache,
        runtime.faults,
        runtime.audit,
        cell_list=runtime.settings.cells,
        plans=runtime.plans,
        dsns=runtime.settings.tenant_mover_database_urls,
    )
    domains = CustomDomains(runtime.db, runtime.cache, runtime.audit, runtime.page_tokens, runtime.settings.base_domain)
    servicer = TenantRegistryServicer(runtime, box, migrations, offboarding, mover, domains)
    gate = entitlements_pb2_grpc.TenantEntitlementsServiceStub(
        service_channel(targets["features"], identity=runtime.identity)
    )

    async def register_plan(tenant: tenant_registry_service_pb2.Tenant) -> None:
        # Idempotent in the feature gate: a retried provisioning registers once.
        request = entitlements_pb2.RegisterTenantRequest(tenant_id=tenant.tenant_id, plan=tenant.plan)
        await gate.RegisterTenant(request, timeout=5)

    servicer.provisioning_steps.append(register_plan)
    tenant_registry_service_pb2_grpc.add_TenantRegistryServiceServicer_to_server(servicer, server)
    tenant_data_pb2_grpc.add_TenantDirectoryServiceServicer_to_server(
        TenantDirectoryServicer(state_source(runtime.db), user_source(runtime.db), domains), server
    )
    user_service_pb2_grpc.add_UserServiceServicer_to_server(UserServicer(runtime), server)
    # max_users: the users the registry knows (UserService's, each tenant's administrator among them).
    held_resources_pb2_grpc.add_HeldResourcesServiceServicer_to_server(
        HeldResourcesServicer(runtime, {"max_users": queries.COUNT_USERS}), server
    )
    settings = runtime.settings
    requests = IdempotencyPurge(
        runtime.db,
        queries.TENANT_REQUESTS,
        settings.idempotency_window_seconds,
        settings.idempotency_purge_interval_seconds,
    )
    runtime.on_start(migrations.resume, offboarding.resume, requests.start, mover.resume)
    runtime.on_stop(migrations.close, offboarding.close, requests.close, mover.close)
    start_tombstone_purge(runtime)
    sso_config.register(server, runtime)


SPEC = ServiceSpec(
    name="tenant",
    schema="tenant",
    services=(
        tenant_registry_service_pb2.DESCRIPTOR.services_by_name["TenantRegistryService"],
        user_service_pb2.DESCRIPTOR.services_by_name["UserService"],
        tenant_data_pb2.DESCRIPTOR.services_by_name["TenantDirectoryService"],
        held_resources_pb2.DESCRIPTOR.services_by_name["HeldResourcesService"],
        *sso_config.SERVICES,
    ),
    migrations_dir=Path(__file__).parent / "migrations",
    register=register,
    sentinels=TENANT_SENTINELS,
    state_source=state_source,
    user_source=user_source,
)

if __name__ == "__main__":
    main(SPEC)
