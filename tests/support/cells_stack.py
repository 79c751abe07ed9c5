"""A stack of its own with more than one database cell, each an embedded PostgreSQL server.

For the tests that need cells (the session stack keeps one): ``tests/test_cells.py`` and
``tests/test_tenant_move.py`` each start one for their module with :func:`cells_stack`.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from towerco.audit.v1 import audit_log_service_pb2_grpc as audit_grpc
from towerco.features.v1 import feature_gate_service_pb2_grpc as features_grpc
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb
from towerco.tenant.v1 import tenant_registry_service_pb2_grpc as tenant_grpc

from deploy.local.stack import Stack, StackConfig
from deploy.local.tokens import mint
from services.runtime.cells import Cell

from .metadata import Metadata, bearer
from .ports import free_port

SERVICES = ("tenant", "sites", "features", "audit")


@dataclass
class CellsStack:
    stack: Stack
    platform: str
    registry: Any
    sites: Any
    features: Any
    audit: Any

    def token(self, tenant: str) -> Metadata:
        return bearer(mint(self.stack.keys_dir, tenant=tenant, role="admin", ttl=3600))

    def create_tenant(self, plan: str = "professional", cell: str = "") -> tenant_pb.Tenant:
        tenant_id = f"c_{uuid.uuid4().hex[:10]}"
        request = tenant_pb.CreateTenantRequest(
            tenant_id=tenant_id,
            tenant=tenant_pb.Tenant(display_name=f"Operator {tenant_id}", plan=plan, admin_email="noc@cells.example"),
            cell=cell,
        )
        created: tenant_pb.Tenant = self.registry.CreateTenant(request, metadata=bearer(self.platform), timeout=20)
        assert created.state == tenant_pb.Tenant.STATE_ACTIVE, created
        return created

    def dsn(self, cell: str) -> str:
        """``cell``'s administrative DSN (the home cell's is the stack's own)."""
        return self.stack.cell_urls.get(cell, self.stack.database_url)


@contextmanager
def cells_stack(output: Path, name: str, cells: Sequence[Cell], env: Mapping[str, str]) -> Iterator[CellsStack]:
    """The platform on ``cells`` (the first the home cell), its logs in ``output/logs/<name>-<service>.log``."""
    data_dir = output / f".data-{name}-{uuid.uuid4().hex[:8]}"
    config = StackConfig(
        data_dir=data_dir,
        pg_port=free_port(),
        redis_port=free_port(),
        ports={service: free_port() for service in SERVICES},
        metrics_ports={service: free_port() for service in SERVICES},
        fast=True,
        env=dict(env),
        cells=tuple(cells),
        cell_pg_ports={cell.name: free_port() for cell in cells[1:]},
    )
    stack = Stack(config)
    (output / "logs").mkdir(parents=True, exist_ok=True)
    logs = {service: (output / "logs" / f"{name}-{service}.log").open("ab") for service in SERVICES}
    channels: list[grpc.Channel] = []
    try:
        stack.start_platform(logs)

        def channel(service: str) -> grpc.Channel:
            opened = grpc.insecure_channel(f"127.0.0.1:{config.ports[service]}")
            channels.append(opened)
            return opened

        yield CellsStack(
            stack,
            mint(stack.keys_dir, role="platform_admin", ttl=3600, subject=f"{name}-admin"),
            tenant_grpc.TenantRegistryServiceStub(channel("tenant")),
            sites_grpc.SiteServiceStub(channel("sites")),
            features_grpc.FeatureGateServiceStub(channel("features")),
            audit_grpc.AuditLogServiceStub(channel("audit")),
        )
    finally:
        for opened in channels:
            opened.close()
        stack.stop_services()
        stack.stop_infra()
        for log in logs.values():
            log.close()
        shutil.rmtree(data_dir, ignore_errors=True)
