"""``python -m services.audit [migrate|retention]``: run the audit log service (or one retention round)."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from grpc import aio
from towerco.audit.v1 import audit_log_service_pb2, audit_log_service_pb2_grpc

from services.runtime.server import Runtime, ServiceSpec, main
from services.runtime.settings import SettingsError

from .canary_sentinels import AUDIT_SENTINELS
from .retention import ensure_retention_role
from .retention_command import run_retention_once
from .retention_job import RetentionJob, held_in
from .servicer import AuditLogServicer

log = logging.getLogger("towerco.audit")


def register(server: aio.Server, runtime: Runtime) -> None:
    audit_log_service_pb2_grpc.add_AuditLogServiceServicer_to_server(AuditLogServicer(runtime), server)
    settings = runtime.settings
    if settings.audit_retention_database_url:
        job = RetentionJob(
            settings.audit_retention_database_url,
            runtime.entitlements.get,
            held_in(runtime.tenants.get),  # pushed on change, like suspension
            settings.audit_retention_interval_seconds,
            settings.audit_retention_batch_size,
            list(settings.audit_retention_cell_database_urls.values()),
        )
        runtime.on_start(job.start)
        runtime.on_stop(job.close)
    else:
        log.warning("AUDIT_RETENTION_DATABASE_URL is not set: no audit events are purged by this process")


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
    if sys.argv[1:] == ["retention"]:
        try:
            asyncio.run(run_retention_once())
        except SettingsError as exc:
            sys.exit(f"audit retention refused to start: {exc}")
    else:
        main(SPEC)
