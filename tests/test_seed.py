"""``make run``'s demo data: created once, then left in whatever state an operator put it.

The demo tenants here get fresh ids (the session's ``tenant_a`` / ``tenant_b`` belong to
other tests), but the same definitions and the same seeding ``make run`` uses.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import grpc
import pytest
from towerco.features.v1 import feature_gate_service_pb2 as features_pb
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb

from deploy.local.seed import DEMO_TENANTS, DemoTenant, SeedReport, seed_demo
from deploy.local.stack import Stack
from deploy.local.tokens import mint

from .support import bearer


def _demo(*kinds: str, **changes: Any) -> dict[str, DemoTenant]:
    """Fresh demo tenants shaped like ``tenant_a`` (without its custom domain, which is taken)."""
    suffix = uuid.uuid4().hex[:8]
    tenant = dataclasses.replace(DEMO_TENANTS["tenant_a"], domains=(), **changes)
    return {f"demo_{kind}_{suffix}": tenant for kind in kinds}


@dataclasses.dataclass(frozen=True)
class Reseeded:
    """Four demo tenants seeded, three of them then suspended, downgraded and deleted, seeded again."""

    suspended: str
    downgraded: str
    deleted: str
    untouched: str
    demo: dict[str, DemoTenant]
    first: SeedReport
    again: SeedReport


@pytest.fixture(scope="module")
def reseeded(stack: Stack, registry: Any, features: Any, platform_token: str) -> Reseeded:
    """Seeded twice, once, for the tests of what seeding again leaves as it is (each looks at one tenant)."""
    demo = _demo("suspended", "downgraded", "deleted", "untouched")
    suspended, downgraded, deleted, untouched = demo
    first = seed_demo(stack.keys_dir, stack.config.ports, demo)
    admin = bearer(platform_token)
    registry.SuspendTenant(tenant_pb.SuspendTenantRequest(tenant_id=suspended, reason="unpaid"), metadata=admin)
    features.SetTenantPlan(features_pb.SetTenantPlanRequest(tenant_id=downgraded, plan="basic"), metadata=admin)
    registry.DeleteTenant(tenant_pb.DeleteTenantRequest(tenant_id=deleted), metadata=admin)
    again = seed_demo(stack.keys_dir, stack.config.ports, demo)  # was: PERMISSION_DENIED, start-up failed
    return Reseeded(suspended, downgraded, deleted, untouched, demo, first, again)


def _state(registry: Any, platform_token: str, tenant_id: str) -> int:
    request = tenant_pb.GetTenantRequest(tenant_id=tenant_id)
    found: tenant_pb.Tenant = registry.GetTenant(request, metadata=bearer(platform_token))
    return found.state


def test_a_first_seeding_makes_every_demo_tenant_active_with_its_sites(reseeded: Reseeded) -> None:
    first = reseeded.first
    assert first.states == dict.fromkeys(reseeded.demo, "STATE_ACTIVE"), first
    assert first.sites == 4 * len(DEMO_TENANTS["tenant_a"].sites)
    assert first.notes == []


def test_seeding_again_leaves_a_suspended_demo_tenant_suspended(
    registry: Any, platform_token: str, reseeded: Reseeded
) -> None:
    assert _state(registry, platform_token, reseeded.suspended) == tenant_pb.Tenant.STATE_SUSPENDED
    assert reseeded.again.states[reseeded.suspended] == "STATE_SUSPENDED"


def test_seeding_again_leaves_a_deleted_demo_tenant_deleted(
    registry: Any, platform_token: str, reseeded: Reseeded
) -> None:
    deleted = reseeded.deleted
    assert _state(registry, platform_token, deleted) in (
        tenant_pb.Tenant.STATE_DELETING,
        tenant_pb.Tenant.STATE_DELETED,
    )
    assert reseeded.again.states[deleted] in ("STATE_DELETING", "STATE_DELETED")


def test_seeding_again_leaves_a_downgraded_demo_tenant_active_on_its_new_plan(
    registry: Any, features: Any, platform_token: str, reseeded: Reseeded
) -> None:
    downgraded, untouched = reseeded.downgraded, reseeded.untouched
    states = (_state(registry, platform_token, downgraded), _state(registry, platform_token, untouched))
    assert states == (tenant_pb.Tenant.STATE_ACTIVE, tenant_pb.Tenant.STATE_ACTIVE)
    request = features_pb.GetEntitlementsRequest(tenant_id=downgraded)
    plan = features.GetEntitlements(request, metadata=bearer(platform_token)).plan
    assert plan == "basic", "seeding put the downgraded demo tenant back on its demo plan"
    assert {reseeded.again.states[downgraded], reseeded.again.states[untouched]} == {"STATE_ACTIVE"}


def test_seeding_again_seeds_only_the_active_tenants_sites_and_notes_the_others(reseeded: Reseeded) -> None:
    again = reseeded.again
    assert again.sites == 2 * len(DEMO_TENANTS["tenant_a"].sites), "only the active tenants' sites are seeded"
    assert len(again.notes) == 2 and all("left as it is" in note for note in again.notes), again.notes


def test_seeding_again_replays_the_active_tenants_sites_instead_of_copying_them(
    stack: Stack, sites: Any, reseeded: Reseeded
) -> None:
    # The seeded sites of the active tenants are the first ones, replayed, not new copies.
    token = mint(stack.keys_dir, tenant=reseeded.untouched, role="admin", ttl=60)
    listed = sites.ListSites(sites_pb.ListSitesRequest(page_size=50), metadata=bearer(token))
    assert sorted(s.site_id for s in listed.sites) == sorted(s.site_id for s in DEMO_TENANTS["tenant_a"].sites)


def test_seeding_reports_what_it_cannot_do_instead_of_stopping_start_up(stack: Stack) -> None:
    broken = _demo("unknown_plan", plan="no-such-plan")
    fine = _demo("fine")
    report = seed_demo(stack.keys_dir, stack.config.ports, {**broken, **fine})
    (broken_id,) = broken
    (fine_id,) = fine
    assert report.states == {broken_id: "unknown", fine_id: "STATE_ACTIVE"}
    assert report.sites == len(DEMO_TENANTS["tenant_a"].sites)
    assert len(report.notes) == 1 and broken_id in report.notes[0], report.notes
    assert grpc.StatusCode.INVALID_ARGUMENT.name in report.notes[0]
