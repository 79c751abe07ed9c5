"""Cross-tenant attempts cannot be used to write without bound into anyone's audit log.

A refusal counts against the caller's own read rate (past it: RATE_LIMITED, not audited);
a suspended tenant's users are refused as suspended; an attempt on a tenant that does not
exist goes to the caller's own log, never to a chain of its own; and repeats of one attempt
are one event per window, carrying their count.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import grpc
import pytest
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb

from .support import bearer, expect_error
from .support.requests import set_limit

pytestmark = pytest.mark.stack

CROSS = "security.cross_tenant_denied"


def unknown_tenant() -> str:
    return f"nx_{uuid.uuid4().hex[:12]}"


def details(row: Any) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(row["details"])
    return parsed


async def cross_events(admin: Any, tenant_id: str, expect: int, wait: float = 15.0) -> list[Any]:
    """The cross-tenant events in ``tenant_id``'s log, once there are ``expect`` of them (or ``wait`` passed)."""
    deadline = time.monotonic() + wait
    while True:
        rows = await admin.fetch(
            "SELECT * FROM audit.events WHERE tenant_id = $1 AND action = $2 ORDER BY sequence", tenant_id, CROSS
        )
        if len(rows) >= expect or time.monotonic() > deadline:
            return list(rows)
        await asyncio.sleep(0.1)


async def test_refusals_count_against_the_callers_read_rate_and_unknown_targets_get_no_log(
    sites, features, new_tenant, token, platform_token, admin
):
    caller = new_tenant(plan="basic")
    set_limit(features, platform_token, caller, "rpm_read", 60)  # 1 a second, 10 s of burst
    viewer = token(caller, role="viewer", sub="probe@caller.example")
    targets = [unknown_tenant() for _ in range(60)]
    outcomes: dict[str, list[str]] = {"CROSS_TENANT_DENIED": [], "RATE_LIMITED": []}
    limited = None
    started = time.monotonic()
    for target in targets:
        error = expect_error(sites.ListSites, sites_pb.ListSitesRequest(), metadata=bearer(viewer, target))
        outcomes[error.reason].append(target)
        if error.reason == "RATE_LIMITED":
            limited = error
    denied = outcomes["CROSS_TENANT_DENIED"]
    # The burst, and one a second while the calls last (each refusal is held a moment).
    assert 1 <= len(denied) <= 15 + (time.monotonic() - started), {k: len(v) for k, v in outcomes.items()}
    assert limited is not None and limited.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert limited.retry is not None and limited.retry.retry_delay.ToMilliseconds() > 0
    assert limited.info is not None and limited.info.metadata["limit"] == "rpm_read"
    # The caller's own reads share that rate: it is spent.
    own = expect_error(sites.ListSites, sites_pb.ListSitesRequest(), metadata=bearer(viewer))
    assert own.reason == "RATE_LIMITED"

    # Only the admitted refusals are audited, in the caller's own log, one per target.
    events = await cross_events(admin, caller, expect=len(denied))
    assert sorted(e["resource"] for e in events) == sorted(f"tenants/{t}" for t in denied)
    assert {details(e)["count"] for e in events} == {1}
    assert {e["user_id"] for e in events} == {"probe@caller.example"}
    # No tenant that does not exist got an event, let alone a chain.
    assert await admin.fetchval("SELECT count(*) FROM audit.events WHERE tenant_id = ANY($1::text[])", targets) == 0


async def test_a_suspended_tenants_user_is_refused_as_suspended_and_nothing_is_recorded(
    sites, registry, new_tenant, token, platform_token, admin, eventually
):
    caller, target = new_tenant(), new_tenant()
    viewer = token(caller, role="viewer")
    registry.SuspendTenant(
        tenant_pb.SuspendTenantRequest(tenant_id=caller, reason="abuse test"),
        metadata=bearer(platform_token),
        timeout=10,
    )

    def suspended() -> None:
        own = expect_error(sites.ListSites, sites_pb.ListSitesRequest(), metadata=bearer(viewer))
        assert own.reason == "TENANT_SUSPENDED"

    eventually(suspended, within=10)  # the suspension has reached the sites process
    for _ in range(5):
        error = expect_error(sites.ListSites, sites_pb.ListSitesRequest(), metadata=bearer(viewer, target))
        assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "TENANT_SUSPENDED")
    await asyncio.sleep(3)  # three refusal windows of the session's services, and a relay round
    rows = await admin.fetch(
        "SELECT tenant_id FROM audit.events WHERE tenant_id = ANY($1::text[]) AND action = $2", [caller, target], CROSS
    )
    assert [r["tenant_id"] for r in rows] == []


async def test_repeated_attempts_are_one_event_with_their_count_written_at_shutdown(
    extra_sites, stack, tenant_pair, token, admin
):
    target, caller = tenant_pair
    # A window longer than the test: the tallies are written when the process stops.
    process = extra_sites(env={"AUDIT_REFUSAL_WINDOW_SECONDS": "600"})
    jwt = token(caller, sub="mallory@b.example")
    first_ids: dict[str, str] = {}
    with grpc.insecure_channel(process.target) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        attempts: list[tuple[str, Any, Any, int]] = [
            ("ListSites", stub.ListSites, sites_pb.ListSitesRequest(), 25),
            ("GetSite", stub.GetSite, sites_pb.GetSiteRequest(site_id="S-1"), 3),
        ]
        for method, call, request, times in attempts:
            for i in range(times):
                request_id = f"rep-{method}-{i}-{uuid.uuid4().hex[:8]}"
                error = expect_error(call, request, metadata=bearer(jwt, target, **{"x-request-id": request_id}))
                assert error.reason == "CROSS_TENANT_DENIED"
                first_ids.setdefault(method, request_id)
    assert await cross_events(admin, target, expect=1, wait=1.5) == []  # tallied, not written yet
    process.process.terminate()
    assert process.process.wait(30) == 0

    events = await cross_events(admin, target, expect=2)
    by_method = {details(e)["method"].rsplit("/", 1)[-1]: e for e in events}
    assert sorted(by_method) == ["GetSite", "ListSites"]
    listing, getting = by_method["ListSites"], by_method["GetSite"]
    assert (details(listing)["count"], details(getting)["count"]) == (25, 3)
    # Each is the first attempt's event: its request id, its caller, from the caller's tenant.
    assert (listing["request_id"], getting["request_id"]) == (first_ids["ListSites"], first_ids["GetSite"])
    assert listing["user_id"] == "mallory@b.example" and details(listing)["caller_tenant"] == caller
    assert await cross_events(admin, caller, expect=1, wait=0.5) == []
