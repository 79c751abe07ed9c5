"""``python -m services.audit [migrate]``: run the audit log service."""

from __future__ import annotations

from pathlib import Path

from grpc import aio
from towerco.audit.v1 import audit_log_service_pb2, audit_log_service_pb2_grpc

from services.runtime.server import Runtime, ServiceSpec, main

from .canary_sentinels import AUDIT_SENTINELS
from .retention import ensure_retention_role
from .servicer import AuditLogServicer


def register(server: aio.Server, runtime: Runtime) -> None:
    audit_log_service_pb2_grpc.add_AuditLogServiceServicer_to_server(AuditLogServicer(runtime), server)


SPEC = ServiceSpec(
    name="audit",
    schema="audit",
    services=(audit_log_service_pb2.DESCRIPTOR.services_by_name["AuditLogService"],),
    migrations_dir=Path(__file__).parent / "migrations",
    register=register,
    sentinels=AUDIT_SENTINELS,
    # Its own refusals (cross-tenant attempts) reach its log through an outbox and
    # WriteEvents, like every other service's.
    outbox=True,
    # The retention role goes with the migrations: set up by whoever applies them.
    after_migrate=ensure_retention_role,
)


if __name__ == "__main__":
    main(SPEC)
