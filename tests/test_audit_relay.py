"""The audit relay through an outage of the audit service: it backs off, says so once, loses nothing.

A relay runs in the test's process over an outbox of its own (a scratch schema in the
session's database, so the services' relays never take its rows) and points at a port
where no audit service listens yet. Events keep arriving, each waking the relay; then a
real audit service process starts on that port and the relay must deliver them all.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import asyncpg
import pytest
from towerco.audit.v1 import audit_log_service_pb2 as audit_pb

from deploy.local.stack import Stack
from services.runtime import audit
from services.runtime.audit import Auditor, AuditRelay
from services.runtime.db import Database
from services.runtime.identity import ServiceIdentity
from services.runtime.settings import DEFAULT_JWT_AUDIENCE, DEFAULT_SERVICE_JWT_ISSUER, DEV_SERVICE_KEY_ID

from .conftest import OUTPUT
from .support import free_port

pytestmark = pytest.mark.stack

OUTAGE_LINE = "audit relay: cannot deliver events"
RECOVERY_LINE = "audit relay: delivering again"


async def test_relay_backs_off_while_the_audit_service_is_down_and_then_delivers_every_event(
    stack: Stack, admin_dsn: str, admin: asyncpg.Connection[Any], scratch_outbox: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="towerco.audit")
    port = free_port()
    identity = ServiceIdentity.from_file(
        "sites", issuer=DEFAULT_SERVICE_JWT_ISSUER, audience=DEFAULT_JWT_AUDIENCE,
        key_file=str(stack.keys_dir / "service-signing-key.pem"), kid=DEV_SERVICE_KEY_ID,
    )  # fmt: skip
    db = await Database.connect(admin_dsn, min_size=1, max_size=4)
    relay = AuditRelay(
        db, scratch_outbox, f"127.0.0.1:{port}", identity, service="sites",
        idle_seconds=0.05, retry_seconds=0.05, max_retry_seconds=0.8,
    )  # fmt: skip
    auditor = Auditor(db, scratch_outbox, relay)
    tenant = f"relay_{uuid.uuid4().hex[:10]}"
    instance = f"audit-{port}"
    # The oldest row is one the audit service will refuse (a bug's event): it must hold up
    # neither the probes nor the batches behind it, and stays in the outbox for repair.
    poison = audit_pb.AuditEvent(
        event_id=str(uuid.uuid4()), tenant_id=tenant, action="relay.test", resource="relay/bad", outcome="BOGUS"
    )
    await auditor.record_alone(poison)
    await relay.start()
    try:
        # 60 events over about 2.4 s, each waking the relay: at the write rate it would try 60 times.
        for i in range(60):
            await auditor.record_alone(audit.event("relay.test", f"relay/{i}", tenant_id=tenant))
            await asyncio.sleep(0.04)
        failed = relay.counts["failed"]
        assert 2 <= failed <= 15, f"{failed} delivery attempts while the audit service was down"
        assert await admin.fetchval(f"SELECT count(*) FROM {scratch_outbox}.audit_outbox") == 61

        with (OUTPUT / "logs" / f"{instance}.log").open("ab") as log:
            stack.start_service("audit", instance=instance, log=log, extra_env={"AUDIT_PORT": str(port)})
        await asyncio.to_thread(stack.wait_serving, "audit", port=port, instance=instance)

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if await admin.fetchval(f"SELECT count(*) FROM {scratch_outbox}.audit_outbox") == 1:
                break
            await asyncio.sleep(0.1)
        resources = await admin.fetch(
            "SELECT resource FROM audit.events WHERE tenant_id = $1 ORDER BY sequence", tenant
        )
        assert [r["resource"] for r in resources] == [f"relay/{i}" for i in range(60)]
        assert relay.counts["delivered"] == 60
        assert relay.counts["refused"] == 1
        kept = await admin.fetchval(f"SELECT event_id FROM {scratch_outbox}.audit_outbox")
        assert str(kept) == poison.event_id
    finally:
        await relay.close()
        await db.close()
        if instance in stack.processes:
            stack.stop(instance)
    lines = [r.getMessage() for r in caplog.records if r.name == "towerco.audit"]
    assert [line for line in lines if line.startswith(OUTAGE_LINE)] == [lines[0]], lines
    assert len([line for line in lines if line.startswith(RECOVERY_LINE)]) == 1, lines
