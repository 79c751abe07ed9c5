"""Legal hold: the registry's SetLegalHold flag, audited, and the audit retention job keeping a held log.

The retention tests follow tests/test_audit_retention.py: an audit process of the test's
own runs the job every second (two events per batch), deleting as ``audit_retention``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
from towerco.features.v1 import feature_gate_service_pb2 as features_pb
from towerco.tenant.v1 import tenant_registry_service_pb2 as pb

from deploy.local.stack import REPO, Stack

from .support import bearer, expect_error
from .support.processes import ExtraService
from .support.requests import get_tenant
from .test_audit_retention import OLD_EVENTS, _old_log, _purged
from .test_audit_service import Writer, settle, stored

ACTION = "tenants.set_legal_hold"


def set_hold(registry: Any, platform_token: str, tenant: str, hold: bool, reason: str = "") -> pb.Tenant:
    request = pb.SetLegalHoldRequest(tenant_id=tenant, hold=hold, reason=reason)
    tenant_msg: pb.Tenant = registry.SetLegalHold(request, metadata=bearer(platform_token), timeout=10)
    return tenant_msg


def shorten(features: Any, platform_token: str, tenant: str, days: int = 30) -> None:
    features.SetLimitOverride(
        features_pb.SetLimitOverrideRequest(tenant_id=tenant, resource="audit_retention_days", limit=days),
        metadata=bearer(platform_token),
        timeout=10,
    )


async def hold_events(admin: asyncpg.Connection[Any], tenant: str) -> list[dict[str, Any]]:
    await settle(admin, tenant)
    return [e for e in await stored(admin, tenant) if e["action"] == ACTION]


def test_only_a_platform_admin_sets_a_legal_hold(registry, token, platform_token, tenant_pair):
    tenant, other = tenant_pair
    request = pb.SetLegalHoldRequest(tenant_id=tenant, hold=True, reason="litigation 2026-17")
    for md in (bearer(token(tenant)), bearer(token(other, permissions=["tenants.manage"]))):
        error = expect_error(registry.SetLegalHold, request, metadata=md)
        assert error.code == grpc.StatusCode.PERMISSION_DENIED, error
    assert not get_tenant(registry, platform_token, tenant).legal_hold


def test_placing_a_hold_needs_a_reason(registry, platform_token, new_tenant):
    tenant = new_tenant("lhr")
    for reason in ("", "   ", "x" * 501):
        request = pb.SetLegalHoldRequest(tenant_id=tenant, hold=True, reason=reason)
        error = expect_error(registry.SetLegalHold, request, metadata=bearer(platform_token))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
        assert error.fields == ["reason"], error
    nameless = pb.SetLegalHoldRequest(hold=True, reason="r")
    missing = expect_error(registry.SetLegalHold, nameless, metadata=bearer(platform_token))
    assert (missing.code, missing.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["tenant_id"]), missing
    unknown = pb.SetLegalHoldRequest(tenant_id=f"none_{uuid.uuid4().hex[:10]}", hold=True, reason="r")
    error = expect_error(registry.SetLegalHold, unknown, metadata=bearer(platform_token))
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "TENANT_NOT_FOUND"), error
    # Lifting needs no reason.
    assert not set_hold(registry, platform_token, tenant, False).legal_hold
    assert not get_tenant(registry, platform_token, tenant).legal_hold


async def test_a_hold_is_idempotent_shown_by_get_tenant_and_audited_once_per_change(
    registry, platform_token, new_tenant, admin
):
    tenant = new_tenant("lhi")
    held = set_hold(registry, platform_token, tenant, True, "litigation 2026-17")
    assert (held.legal_hold, held.legal_hold_reason) == (True, "litigation 2026-17")
    # The same state again, even with another reason, changes and records nothing.
    again = set_hold(registry, platform_token, tenant, True, "another reason")
    assert (again.legal_hold, again.legal_hold_reason) == (True, "litigation 2026-17")
    shown = get_tenant(registry, platform_token, tenant)
    assert (shown.legal_hold, shown.legal_hold_reason) == (True, "litigation 2026-17")
    assert shown.state == pb.Tenant.State.STATE_ACTIVE
    (placed,) = await hold_events(admin, tenant)
    assert placed["user_id"] == "test-platform-admin" and placed["resource"] == f"tenants/{tenant}"
    assert "litigation 2026-17" in str(placed["details"])

    lifted = set_hold(registry, platform_token, tenant, False, "case closed")
    assert (lifted.legal_hold, lifted.legal_hold_reason) == (False, "")
    set_hold(registry, platform_token, tenant, False)
    assert not get_tenant(registry, platform_token, tenant).legal_hold
    events = await hold_events(admin, tenant)
    assert len(events) == 2 and "case closed" in str(events[1]["details"]), events


async def test_the_job_keeps_a_held_tenants_events_and_purges_them_once_the_hold_is_lifted(
    audit, features, registry, service_token, platform_token, provision, admin, admin_dsn, extra_service
):
    writer = Writer(audit, bearer(service_token(service="sites")))
    # 60 days old, under a 30-day override: both would be purged but for the hold.
    held = await _old_log(writer, provision, admin, "lh", timedelta(days=60))
    control = await _old_log(writer, provision, admin, "lc", timedelta(days=60))
    set_hold(registry, platform_token, held, True, "litigation 2026-17")
    for tenant in (held, control):
        shorten(features, platform_token, tenant)
    await settle(admin, held, control)
    job: ExtraService = extra_service(
        "audit",
        env={
            "AUDIT_RETENTION_DATABASE_URL": admin_dsn,
            "AUDIT_RETENTION_INTERVAL_SECONDS": "1",
            "AUDIT_RETENTION_BATCH_SIZE": "2",
        },
    )
    await _purged(admin, control)
    # A tenant written after that round started goes in a later round: by then the held one was seen.
    later = await _old_log(writer, provision, admin, "ll", timedelta(days=60))
    shorten(features, platform_token, later)
    await _purged(admin, later)
    assert [r["sequence"] for r in await stored(admin, held)][:OLD_EVENTS] == list(range(1, OLD_EVENTS + 1))
    assert f"for tenant {held}" not in job.output()

    # Lifting reaches the running process (pushed like suspension): its events go.
    set_hold(registry, platform_token, held, False)
    await _purged(admin, held)
    assert f"removed {OLD_EVENTS} older than 30 days for tenant {held}" in job.output()


async def test_the_cronjobs_command_skips_a_held_tenant(
    audit, features, registry, service_token, platform_token, provision, admin, admin_dsn, stack: Stack
):
    writer = Writer(audit, bearer(service_token(service="sites")))
    held = await _old_log(writer, provision, admin, "lk", timedelta(days=60))
    control = await _old_log(writer, provision, admin, "lo", timedelta(days=60))
    set_hold(registry, platform_token, held, True, "regulator's request")
    for tenant in (held, control):
        shorten(features, platform_token, tenant)
    await settle(admin, held, control)
    env = stack.service_env({"AUDIT_RETENTION_DATABASE_URL": admin_dsn, "AUDIT_RETENTION_BATCH_SIZE": "2"})
    command = [sys.executable, "-m", "services.audit", "retention"]
    done = await asyncio.to_thread(subprocess.run, command, cwd=REPO, env=env, capture_output=True, timeout=60)
    output = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, output
    assert f"removed {OLD_EVENTS} older than 30 days for tenant {control}" in output
    assert f"for tenant {held}" not in output
    assert min(r["sequence"] for r in await stored(admin, held)) == 1


def test_a_deleted_tenant_cannot_be_held(registry, platform_token, new_tenant):
    tenant = new_tenant("lhd")
    registry.DeleteTenant(pb.DeleteTenantRequest(tenant_id=tenant), metadata=bearer(platform_token), timeout=10)
    request = pb.SetLegalHoldRequest(tenant_id=tenant, hold=True, reason="too late")
    error = expect_error(registry.SetLegalHold, request, metadata=bearer(platform_token))
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "TENANT_STATE_CONFLICT"), error
    assert not get_tenant(registry, platform_token, tenant).legal_hold
