"""The audit service's retention job: each tenant's events older than its plan's period go, on their own.

An audit process of the test's own runs the job every second, deleting as
``audit_retention`` (``AUDIT_RETENTION_DATABASE_URL``: the session's administrative DSN),
two events per transaction so that a purge takes several batches.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from towerco.audit.v1 import audit_log_service_pb2 as pb
from towerco.features.v1 import feature_gate_service_pb2 as features_pb

from deploy.local.stack import REPO, Stack

from .support import bearer
from .support.processes import ExtraService
from .test_audit_service import Reader, Writer, event, settle, stored, ts

OLD_EVENTS = 5


async def _old_log(writer: Writer, provision: Callable[[str], None], admin: Any, prefix: str, age: timedelta) -> str:
    """A fresh tenant whose log starts with ``OLD_EVENTS`` events ``age`` old, then its provisioning."""
    tenant = f"{prefix}_{uuid.uuid4().hex[:10]}"
    moment = datetime.now(UTC) - age
    writer.write([event(tenant, create_time=ts(moment + timedelta(seconds=i))) for i in range(OLD_EVENTS)])
    provision(tenant)
    await settle(admin, tenant)
    return tenant


async def _purged(admin: asyncpg.Connection[Any], tenant: str, within: float = 30.0) -> list[int]:
    """Wait until ``tenant``'s old events are gone; its remaining sequences."""
    deadline = time.monotonic() + within
    while True:
        sequences = [r["sequence"] for r in await stored(admin, tenant)]
        if sequences and sequences[0] > OLD_EVENTS:
            return sequences
        assert time.monotonic() < deadline, f"{tenant}'s old events were not purged: {sequences}"
        await asyncio.sleep(0.1)


async def test_the_job_purges_only_the_tenants_whose_period_ended_and_keeps_a_keep_forever_one(
    audit, features, service_token, token, platform_token, provision, admin, admin_dsn, extra_service
):
    writer = Writer(audit, bearer(service_token(service="sites")))
    platform = bearer(platform_token)
    # 60 days old: past a 30-day override, inside every plan's own period (90 days and more).
    shortened = await _old_log(writer, provision, admin, "rs", timedelta(days=60))
    on_plan = await _old_log(writer, provision, admin, "rp", timedelta(days=60))
    # Older than any plan keeps, but kept forever (-1: a period, not the legal hold of test_legal_hold.py).
    forever = await _old_log(writer, provision, admin, "rh", timedelta(days=4000))
    for tenant, days in ((shortened, 30), (forever, -1)):
        features.SetLimitOverride(
            features_pb.SetLimitOverrideRequest(tenant_id=tenant, resource="audit_retention_days", limit=days),
            metadata=platform,
            timeout=10,
        )
    await settle(admin, shortened, forever)  # the overrides are audited in the tenants' own logs
    before = {t: [r["sequence"] for r in await stored(admin, t)] for t in (on_plan, forever)}
    assert all(sequences[:OLD_EVENTS] == list(range(1, OLD_EVENTS + 1)) for sequences in before.values())
    job: ExtraService = extra_service(
        "audit",
        env={
            "AUDIT_RETENTION_DATABASE_URL": admin_dsn,
            "AUDIT_RETENTION_INTERVAL_SECONDS": "1",
            "AUDIT_RETENTION_BATCH_SIZE": "2",
        },
    )

    remaining = await _purged(admin, shortened)
    # Every event from the first one inside the period stays: an unbroken tail that verifies.
    assert remaining == list(range(OLD_EVENTS + 1, remaining[-1] + 1))
    reader = Reader(audit, bearer(token(shortened)))
    assert reader.verify() == pb.VerifyChainResponse(valid=True, events_checked=len(remaining))
    assert f"removed {OLD_EVENTS} older than 30 days for tenant {shortened}" in job.output()

    # A tenant written after that round has started is purged only by a later round, so
    # when its events go, the round that purged `shortened` has seen every tenant.
    later = await _old_log(writer, provision, admin, "rl", timedelta(days=60))
    features.SetLimitOverride(
        features_pb.SetLimitOverrideRequest(tenant_id=later, resource="audit_retention_days", limit=30),
        metadata=platform,
        timeout=10,
    )
    await _purged(admin, later)
    # Their logs only grew (a later audited change may have added to them): nothing was purged.
    for tenant, sequences in before.items():
        assert [r["sequence"] for r in await stored(admin, tenant)][: len(sequences)] == sequences, tenant
    assert f"for tenant {forever}" not in job.output() and f"for tenant {on_plan}" not in job.output()


async def test_the_cronjobs_command_purges_once_and_exits(
    audit, features, service_token, platform_token, provision, admin, admin_dsn, stack: Stack
):
    writer = Writer(audit, bearer(service_token(service="sites")))
    tenant = await _old_log(writer, provision, admin, "rc", timedelta(days=60))
    features.SetLimitOverride(
        features_pb.SetLimitOverrideRequest(tenant_id=tenant, resource="audit_retention_days", limit=30),
        metadata=bearer(platform_token),
        timeout=10,
    )
    env = stack.service_env({"AUDIT_RETENTION_DATABASE_URL": admin_dsn, "AUDIT_RETENTION_BATCH_SIZE": "2"})
    command = [sys.executable, "-m", "services.audit", "retention"]
    done = await asyncio.to_thread(subprocess.run, command, cwd=REPO, env=env, capture_output=True, timeout=60)
    output = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, output
    assert f"removed {OLD_EVENTS} older than 30 days for tenant {tenant}" in output
    assert min(r["sequence"] for r in await stored(admin, tenant)) == OLD_EVENTS + 1
