"""Every change reaches the audit log exactly once, through each service's outbox.

Events are checked where they end up (``audit.events``, read as the superuser) by the
request id of the call that made the change, so each assertion names one call.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from towerco.audit.v1 import audit_log_service_pb2 as audit_pb
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb

from deploy.local.stack import Stack
from services.runtime.audit import GATEWAY_HEADER
from services.runtime.context import Caller, RequestContext
from services.runtime.settings import gateway_secret

from . import grpcweb
from .support import bearer, expect_error

pytestmark = pytest.mark.stack

SECRET = "Sup3r-Secret-Value-42"


async def events_for(admin: Any, tenant_id: str, request_id: str, *, expect: int = 1, wait: float = 15.0) -> list[Any]:
    """The events of one call, once the relay has delivered them (waits for ``expect``)."""
    deadline = time.monotonic() + wait
    while True:
        rows = await admin.fetch(
            "SELECT * FROM audit.events WHERE tenant_id = $1 AND request_id = $2 ORDER BY sequence",
            tenant_id,
            request_id,
        )
        if len(rows) >= expect or time.monotonic() > deadline:
            # Give a late duplicate the chance to show up before concluding "exactly".
            await asyncio.sleep(0.3)
            return list(
                await admin.fetch(
                    "SELECT * FROM audit.events WHERE tenant_id = $1 AND request_id = $2 ORDER BY sequence",
                    tenant_id,
                    request_id,
                )
            )
        await asyncio.sleep(0.05)


def rid(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}"


async def test_site_changes_each_yield_one_event(sites, token, tenant_pair, admin):
    tenant, _ = tenant_pair
    jwt = token(tenant, sub="alice@operator.example")
    create, update, delete = rid("create"), rid("update"), rid("delete")
    sites.CreateSite(
        sites_pb.CreateSiteRequest(site_id="AUD-1", site=sites_pb.Site(name="Audited")),
        metadata=bearer(jwt, **{"x-request-id": create}),
        timeout=10,
    )
    sites.UpdateSite(
        sites_pb.UpdateSiteRequest(
            site=sites_pb.Site(site_id="AUD-1", name="Renamed"), update_mask=field_mask_pb2.FieldMask(paths=["name"])
        ),
        metadata=bearer(jwt, **{"x-request-id": update}),
        timeout=10,
    )
    sites.DeleteSite(
        sites_pb.DeleteSiteRequest(site_id="AUD-1"), metadata=bearer(jwt, **{"x-request-id": delete}), timeout=10
    )
    for request_id, action in ((create, "sites.create"), (update, "sites.update"), (delete, "sites.delete")):
        rows = await events_for(admin, tenant, request_id)
        assert len(rows) == 1, (action, rows)
        event = rows[0]
        assert event["action"] == action
        assert event["resource"] == "sites/AUD-1"
        assert event["user_id"] == "alice@operator.example"
        assert event["outcome"] == "OK"
        assert event["ip_address"] == "127.0.0.1"


async def test_reads_and_failed_changes_yield_no_event(sites, token, tenant_pair, admin):
    tenant, _ = tenant_pair
    jwt = token(tenant)
    read, missing = rid("read"), rid("missing")
    sites.ListSites(sites_pb.ListSitesRequest(), metadata=bearer(jwt, **{"x-request-id": read}), timeout=10)
    expect_error(
        sites.DeleteSite,
        sites_pb.DeleteSiteRequest(site_id="NOPE-1"),
        metadata=bearer(jwt, **{"x-request-id": missing}),
    )
    assert await events_for(admin, tenant, read, expect=1, wait=1.0) == []
    assert await events_for(admin, tenant, missing, expect=1, wait=1.0) == []


async def test_a_direct_call_cannot_set_the_audited_client_address(sites, token, tenant_pair, admin):
    tenant, _ = tenant_pair
    request_id = rid("xff-direct")
    # Reaching the service directly, a caller claims to be 6.6.6.6: the peer address is recorded.
    metadata = bearer(token(tenant), **{"x-request-id": request_id, "x-forwarded-for": "6.6.6.6"})
    sites.CreateSite(
        sites_pb.CreateSiteRequest(site_id="XFF-1", site=sites_pb.Site(name="Direct")), metadata=metadata, timeout=10
    )
    (event,) = await events_for(admin, tenant, request_id)
    assert event["ip_address"] == "127.0.0.1"


@pytest.mark.parametrize("secret", ["right", "wrong"])
async def test_only_the_gateways_secret_makes_the_forwarded_address_believed(
    sites, stack, token, tenant_pair, admin, secret
):
    tenant, _ = tenant_pair
    request_id = rid(f"xff-{secret}")
    proof = gateway_secret(stack.keys_dir).decode() if secret == "right" else "guessed-secret"
    # The client claims 1.2.3.4; the gateway appended what it saw, 203.0.113.7.
    metadata = bearer(
        token(tenant),
        **{"x-request-id": request_id, "x-forwarded-for": "1.2.3.4, 203.0.113.7", GATEWAY_HEADER: proof},
    )
    sites.CreateSite(
        sites_pb.CreateSiteRequest(site_id=f"XFF-{secret}", site=sites_pb.Site(name="Via gateway")),
        metadata=metadata,
        timeout=10,
    )
    (event,) = await events_for(admin, tenant, request_id)
    assert event["ip_address"] == ("203.0.113.7" if secret == "right" else "127.0.0.1")


def test_the_forwarded_address_is_believed_from_the_gateway_or_a_platform_service_only():
    def caller(service: bool) -> Caller:
        return Caller(subject="s", tenant_id="platform", role="r", permissions=frozenset(), token="", service=service)

    def seen(**fields: Any) -> str:
        return RequestContext(request_id="r", method="m", peer_ip="127.0.0.1", **fields).client_ip

    assert seen(forwarded_ip="203.0.113.7") == "127.0.0.1"
    assert seen(forwarded_ip="203.0.113.7", caller=caller(service=False)) == "127.0.0.1"
    assert seen(forwarded_ip="203.0.113.7", via_gateway=True) == "203.0.113.7"
    assert seen(forwarded_ip="203.0.113.7", caller=caller(service=True)) == "203.0.113.7"
    assert seen(via_gateway=True) == "127.0.0.1"  # the gateway named no address: the peer's


async def test_through_the_gateway_the_address_envoy_saw_is_recorded(gateway, token, tenant_pair, admin):
    tenant, _ = tenant_pair
    reply = grpcweb.call(
        gateway.port,
        f"{tenant}.localhost:{gateway.port}",
        "/towerco.sites.v1.SiteService/CreateSite",
        sites_pb.CreateSiteRequest(site_id="XFF-GW", site=sites_pb.Site(name="Through the gateway")),
        token=token(tenant),
        headers={"X-Forwarded-For": "6.6.6.6", GATEWAY_HEADER: "forged"},
    )
    reply.one(sites_pb.Site)
    (event,) = await events_for(admin, tenant, reply.trailers["x-request-id"])
    # Envoy appends the client's address, and for a loopback client its own local address,
    # which differs from the peer the service sees (Envoy, on 127.0.0.1) when the machine
    # has a network address; the client's own claim is never taken.
    hostname = await asyncio.to_thread(subprocess.run, ["hostname", "-I"], capture_output=True, text=True, check=False)
    local = set(hostname.stdout.split())
    assert event["ip_address"] in ({a for a in local if not ipaddress.ip_address(a).is_loopback} or {"127.0.0.1"})


async def test_registry_changes_each_yield_one_event_without_secrets(registry, platform_token, token, admin):
    tenant = f"au_{uuid.uuid4().hex[:10]}"
    create = rid("tcreate")
    registry.CreateTenant(
        tenant_pb.CreateTenantRequest(
            tenant_id=tenant,
            request_id=create,
            tenant=tenant_pb.Tenant(display_name="Audited Towers", plan="basic", admin_email="noc@audited.example"),
        ),
        metadata=bearer(platform_token, **{"x-request-id": create}),
        timeout=10,
    )
    # The same request again is a replay, not a second change.
    registry.CreateTenant(
        tenant_pb.CreateTenantRequest(
            tenant_id=tenant,
            request_id=create,
            tenant=tenant_pb.Tenant(display_name="Audited Towers", plan="basic", admin_email="noc@audited.example"),
        ),
        metadata=bearer(platform_token, **{"x-request-id": create}),
        timeout=10,
    )
    settings = rid("settings")
    registry.UpdateTenantSettings(
        tenant_pb.UpdateTenantSettingsRequest(
            settings=tenant_pb.TenantSettings(
                integrations=tenant_pb.Integrations(
                    smtp=tenant_pb.SmtpSettings(host="smtp.audited.example", port=587, password=SECRET),
                    api_keys={"maps": SECRET},
                )
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["integrations"]),
        ),
        metadata=bearer(token(tenant), **{"x-request-id": settings}),
        timeout=10,
    )
    suspend, reactivate = rid("suspend"), rid("reactivate")
    registry.SuspendTenant(
        tenant_pb.SuspendTenantRequest(tenant_id=tenant, reason="audit test"),
        metadata=bearer(platform_token, **{"x-request-id": suspend}),
        timeout=10,
    )
    registry.ReactivateTenant(
        tenant_pb.ReactivateTenantRequest(tenant_id=tenant),
        metadata=bearer(platform_token, **{"x-request-id": reactivate}),
        timeout=10,
    )
    expected = {
        create: ("tenants.create", f"tenants/{tenant}"),
        settings: ("settings.update", f"tenants/{tenant}/settings"),
        suspend: ("tenants.suspend", f"tenants/{tenant}"),
        reactivate: ("tenants.reactivate", f"tenants/{tenant}"),
    }
    for request_id, (action, resource) in expected.items():
        rows = await events_for(admin, tenant, request_id)
        assert [(r["action"], r["resource"]) for r in rows] == [(action, resource)], request_id
    (settings_event,) = await events_for(admin, tenant, settings)
    assert "integrations" in str(settings_event["details"])
    (suspend_event,) = await events_for(admin, tenant, suspend)
    assert "audit test" in str(suspend_event["details"])
    every = await admin.fetch("SELECT e::text AS row FROM audit.events e WHERE tenant_id = $1", tenant)
    assert every and not any(SECRET in r["row"] for r in every)
    for schema in ("tenant", "sites"):
        outbox = await admin.fetch(f"SELECT encode(event, 'escape') AS row FROM {schema}.audit_outbox")
        assert not any(SECRET in r["row"] for r in outbox)


async def test_cross_tenant_attempt_is_in_the_targets_log(sites, token, tenant_pair, admin):
    tenant_a, tenant_b = tenant_pair
    request_id = rid("cross")
    error = expect_error(
        sites.ListSites,
        sites_pb.ListSitesRequest(),
        metadata=bearer(token(tenant_b, sub="mallory@b.example"), tenant_a, **{"x-request-id": request_id}),
    )
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    (event,) = await events_for(admin, tenant_a, request_id)
    assert event["action"] == "security.cross_tenant_denied"
    assert event["outcome"] == "PERMISSION_DENIED"
    assert event["user_id"] == "mallory@b.example"
    assert tenant_b in str(event["details"])
    assert await events_for(admin, tenant_b, request_id, wait=0.5) == []


# --- Nothing lost while the audit service is down --------------------------------------


@pytest.fixture
def audit_switch(stack: Stack) -> Iterator[dict[str, Any]]:
    """Stop and start the platform's audit service (every relay of every process sends to it)."""
    log = (Path(__file__).resolve().parents[1] / "test-output" / "logs" / "audit.log").open("ab")

    def stop() -> None:
        process = stack.processes["audit"]
        process.terminate()
        process.wait(20)

    def start() -> None:
        stack.start_service("audit", log=log, extra_env={"MIGRATE_ON_START": "0"})
        stack.wait_serving("audit")

    try:
        yield {"stop": stop, "start": start}
    finally:
        if stack.processes["audit"].poll() is not None:
            start()
        log.close()


async def test_changes_made_while_audit_is_down_arrive_exactly_once(
    audit_switch, sites_target, token, tenant_pair, admin
):
    tenant, _ = tenant_pair
    jwt = token(tenant)
    audit_switch["stop"]()
    with grpc.insecure_channel(sites_target) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        for i in range(100):
            stub.CreateSite(
                sites_pb.CreateSiteRequest(site_id=f"DOWN-{i:03d}", site=sites_pb.Site(name=f"Down {i}")),
                metadata=bearer(jwt, **{"x-request-id": f"down-{tenant}-{i}"}),
                timeout=10,
            )
    # Every change succeeded and its event waits in the outbox.
    waiting = await admin.fetchval("SELECT count(*) FROM sites.audit_outbox WHERE tenant_id = $1", tenant)
    assert waiting == 100
    sites_events = "SELECT count(*) FROM audit.events WHERE tenant_id = $1 AND resource LIKE 'sites/%'"
    assert await admin.fetchval(sites_events, tenant) == 0

    audit_switch["start"]()
    deadline = time.monotonic() + 30
    while await admin.fetchval("SELECT count(*) FROM sites.audit_outbox WHERE tenant_id = $1", tenant):
        assert time.monotonic() < deadline, "the outbox was not drained after the audit service returned"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # a duplicate delivery would land now
    rows = await admin.fetch(
        "SELECT resource, count(*) AS n FROM audit.events WHERE tenant_id = $1 AND resource LIKE 'sites/%' "
        "GROUP BY resource",
        tenant,
    )
    assert len(rows) == 100
    assert {r["n"] for r in rows} == {1}
    assert {r["resource"] for r in rows} == {f"sites/DOWN-{i:03d}" for i in range(100)}


async def test_one_refused_event_does_not_hold_up_the_others(sites, token, tenant_pair, admin):
    tenant, _ = tenant_pair
    # An event the audit service refuses (an outcome that is no gRPC status), as a bug would write it.
    poison = audit_pb.AuditEvent(
        event_id=str(uuid.uuid4()), tenant_id=tenant, action="sites.create", resource="sites/BAD", outcome="BOGUS"
    )
    await admin.execute(
        "INSERT INTO sites.audit_outbox (tenant_id, event_id, event) VALUES ($1, $2, $3)",
        tenant,
        uuid.UUID(poison.event_id),
        poison.SerializeToString(),
    )
    request_id = rid("after-poison")
    sites.CreateSite(
        sites_pb.CreateSiteRequest(site_id="GOOD-1", site=sites_pb.Site(name="Good")),
        metadata=bearer(token(tenant), **{"x-request-id": request_id}),
        timeout=10,
    )
    (event,) = await events_for(admin, tenant, request_id)
    assert event["resource"] == "sites/GOOD-1"
    # The refused event is kept, not dropped: someone can repair it.
    kept = await admin.fetchval(
        "SELECT count(*) FROM sites.audit_outbox WHERE tenant_id = $1 AND event_id = $2",
        tenant,
        uuid.UUID(poison.event_id),
    )
    assert kept == 1
    await admin.execute("DELETE FROM sites.audit_outbox WHERE tenant_id = $1", tenant)


async def test_delete_and_migrate_each_yield_one_event(registry, platform_token, token, tenant_pair, admin):
    source, target = tenant_pair
    migrate = rid("migrate")
    migration = registry.MigrateTenantData(
        tenant_pb.MigrateTenantDataRequest(source_tenant_id=source, target_tenant_id=target, data_types=["settings"]),
        metadata=bearer(platform_token, **{"x-request-id": migrate}),
        timeout=10,
    )
    (event,) = await events_for(admin, "platform", migrate)
    assert (event["action"], event["resource"]) == ("tenants.migrate", f"migrations/{migration.migration_id}")
    assert target in str(event["details"])
    deadline = time.monotonic() + 15
    while registry.GetMigration(
        tenant_pb.GetMigrationRequest(migration_id=migration.migration_id), metadata=bearer(platform_token), timeout=10
    ).state in (tenant_pb.Migration.STATE_PENDING, tenant_pb.Migration.STATE_RUNNING):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    delete = rid("delete-tenant")
    registry.DeleteTenant(
        tenant_pb.DeleteTenantRequest(tenant_id=source),
        metadata=bearer(platform_token, **{"x-request-id": delete}),
        timeout=10,
    )
    (event,) = await events_for(admin, source, delete)
    assert (event["action"], event["resource"], event["outcome"]) == ("tenants.delete", f"tenants/{source}", "OK")


async def test_feature_gate_changes_each_yield_one_event_naming_the_admin(features, new_tenant, platform_token, admin):
    from towerco.features.v1 import feature_gate_service_pb2 as features_pb

    tenant = new_tenant(plan="basic")
    calls = {
        rid("plan"): (
            features.SetTenantPlan,
            features_pb.SetTenantPlanRequest(tenant_id=tenant, plan="professional"),
            "features.set_plan",
        ),
        rid("feature"): (
            features.SetFeatureOverride,
            features_pb.SetFeatureOverrideRequest(tenant_id=tenant, feature="sso", enabled=True),
            "features.set_feature_override",
        ),
        rid("limit"): (
            features.SetLimitOverride,
            features_pb.SetLimitOverrideRequest(tenant_id=tenant, resource="max_users", limit=25),
            "features.set_limit_override",
        ),
    }
    for request_id, (method, request, _) in calls.items():
        method(request, metadata=bearer(platform_token, **{"x-request-id": request_id}), timeout=10)
        # The same change again changes nothing and is not recorded again.
        method(request, metadata=bearer(platform_token, **{"x-request-id": request_id}), timeout=10)
    for request_id, (_, _, action) in calls.items():
        rows = await events_for(admin, tenant, request_id)
        assert [(r["action"], r["resource"], r["user_id"], r["outcome"]) for r in rows] == [
            (action, f"tenants/{tenant}/entitlements", "test-platform-admin", "OK")
        ], request_id
    (plan_event,) = await events_for(admin, tenant, next(iter(calls)))
    assert json.loads(plan_event["details"]) == {"plan": "professional", "previous_plan": "basic"}
