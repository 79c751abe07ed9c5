"""A lifecycle or entitlement change reaches every process however Redis behaves.

Every process here uses a Redis of the test's own, which the test kills (SIGKILL) and
starts again on the same port with what it had persisted: the old values, an hour to
live. Changes made right after must be enforced by every process, and stay enforced well
past the time a process trusts its memory (``TENANT_CACHE_SECONDS``, 1 s here), until
they are undone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import redis
from towerco.features.v1 import feature_gate_service_pb2 as features_pb
from towerco.features.v1 import feature_gate_service_pb2_grpc as features_grpc
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb
from towerco.tenant.v1 import tenant_registry_service_pb2_grpc as tenant_grpc

from .conftest import ExtraService, PrivateRedis
from .support import bearer, expect_error

LOCAL_SECONDS = 1.0
ANALYTICS = sites_pb.GetSiteAnalyticsRequest()


@dataclass
class Processes:
    """A registry and a feature gate that make the changes, and a sites process that enforces them."""

    writers: list[ExtraService]
    registry: Any
    gate: Any
    sites: Any


@pytest.fixture
def on_private_redis(extra_service: Any, private_redis: PrivateRedis) -> Iterator[Callable[..., Processes]]:
    """``on_private_redis(sites_asks_writers=True)``: the three processes, all on the private Redis."""
    env = {"REDIS_URL": private_redis.url, "TENANT_CACHE_SECONDS": str(LOCAL_SECONDS)}
    with ExitStack() as channels:

        def start(sites_asks_writers: bool = True) -> Processes:
            registry, gate = extra_service("tenant", env), extra_service("features", env)
            # Asking the session's registry and gate instead lets a test stop these two.
            sources = {"TENANT_TARGET": registry.target, "FEATURES_TARGET": gate.target}
            sites = extra_service("sites", {**env, **(sources if sites_asks_writers else {})})
            registry_channel, gate_channel, sites_channel = (
                channels.enter_context(grpc.insecure_channel(p.target)) for p in (registry, gate, sites)
            )
            return Processes(
                [registry, gate],
                tenant_grpc.TenantRegistryServiceStub(registry_channel),
                features_grpc.FeatureGateServiceStub(gate_channel),
                sites_grpc.SiteServiceStub(sites_channel),
            )

        yield start


@dataclass
class Tenants:
    """Three active professional tenants: one to suspend, one to downgrade, one to withhold a feature from."""

    suspended: str
    downgraded: str
    withheld: str
    md: dict[str, Any]

    @classmethod
    def make(cls, new_tenant: Callable[..., str], token: Callable[..., str]) -> Tenants:
        suspended, downgraded, withheld = (new_tenant(plan="professional") for _ in range(3))
        md = {tenant: bearer(token(tenant)) for tenant in (suspended, downgraded, withheld)}
        return cls(suspended, downgraded, withheld, md)


def held_everywhere(p: Processes, t: Tenants, private_redis: PrivateRedis) -> None:
    """Every process and Redis hold the three as active professionals (the copies a change must replace).

    The writers' reads also leave connections in their Redis pools, as a running platform's would.
    """
    for md in t.md.values():
        p.sites.GetSiteAnalytics(ANALYTICS, metadata=md, timeout=10)
        p.registry.GetTenantSettings(tenant_pb.GetTenantSettingsRequest(), metadata=md, timeout=10)
        p.gate.GetEntitlements(features_pb.GetEntitlementsRequest(), metadata=md, timeout=10)
    assert '"STATE_ACTIVE"' in stored(private_redis, t.suspended, "state")
    assert '"professional"' in stored(private_redis, t.downgraded, "entitlements")


def make_changes(p: Processes, t: Tenants, admin: Any) -> None:
    p.registry.SuspendTenant(
        tenant_pb.SuspendTenantRequest(tenant_id=t.suspended, reason="coherence test"), metadata=admin, timeout=20
    )
    p.gate.SetTenantPlan(
        features_pb.SetTenantPlanRequest(tenant_id=t.downgraded, plan="basic"), metadata=admin, timeout=20
    )
    p.gate.SetFeatureOverride(
        features_pb.SetFeatureOverrideRequest(tenant_id=t.withheld, feature="advanced_analytics", enabled=False),
        metadata=admin,
        timeout=20,
    )


def all_enforced(sites: Any, t: Tenants) -> None:
    refused_with(sites, t.md[t.suspended], "TENANT_SUSPENDED")
    refused_with(sites, t.md[t.downgraded], "FEATURE_NOT_IN_PLAN")
    error = expect_error(sites.GetSiteAnalytics, ANALYTICS, metadata=t.md[t.withheld])
    assert error.code == grpc.StatusCode.PERMISSION_DENIED, error
    assert error.info is not None and error.info.metadata["feature"] == "advanced_analytics", error


def enforced_for_good(sites: Any, t: Tenants, eventually: Callable[..., Any]) -> None:
    """Enforced, and still enforced after several local cache windows."""
    eventually(lambda: all_enforced(sites, t), within=5.0)
    until = time.monotonic() + 4 * LOCAL_SECONDS
    while time.monotonic() < until:
        time.sleep(0.1)
        all_enforced(sites, t)


def undo_changes(p: Processes, t: Tenants, admin: Any, eventually: Callable[..., Any]) -> None:
    """Reactivated and restored through the writers: sites serves the three again."""
    p.registry.ReactivateTenant(tenant_pb.ReactivateTenantRequest(tenant_id=t.suspended), metadata=admin, timeout=10)
    p.gate.SetTenantPlan(
        features_pb.SetTenantPlanRequest(tenant_id=t.downgraded, plan="professional"), metadata=admin, timeout=10
    )
    p.gate.SetFeatureOverride(
        features_pb.SetFeatureOverrideRequest(tenant_id=t.withheld, feature="advanced_analytics", enabled=True),
        metadata=admin,
        timeout=10,
    )
    eventually(lambda: [p.sites.GetSiteAnalytics(ANALYTICS, metadata=md, timeout=10) for md in t.md.values()])


def stored(private_redis: PrivateRedis, tenant_id: str, kind: str) -> str:
    client = redis.Redis.from_url(private_redis.url, socket_timeout=2)
    try:
        raw: bytes | None = client.get(f"tenant:{{{tenant_id}}}:{kind}")  # type: ignore[assignment]
    finally:
        client.close()
    return raw.decode() if raw else ""


def refused_with(stub: Any, md: Any, reason: str) -> None:
    error = expect_error(stub.GetSiteAnalytics, ANALYTICS, metadata=md)
    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, reason), error


def test_changes_made_just_after_redis_restarted_stay_enforced_until_undone(
    on_private_redis, private_redis, new_tenant, token, platform_token, eventually
):
    p, t, admin = on_private_redis(), Tenants.make(new_tenant, token), bearer(platform_token)
    held_everywhere(p, t, private_redis)
    private_redis.crash()
    private_redis.restart()
    assert '"STATE_ACTIVE"' in stored(private_redis, t.suspended, "state")  # the old values survived

    make_changes(p, t, admin)  # the writers' pooled connections died with the old server

    enforced_for_good(p.sites, t, eventually)
    # Redis itself no longer holds what the changes replaced.
    assert '"STATE_SUSPENDED"' in stored(private_redis, t.suspended, "state")
    assert '"basic"' in stored(private_redis, t.downgraded, "entitlements")
    undo_changes(p, t, admin, eventually)


def test_changes_made_while_redis_was_down_stay_enforced_after_it_returns_though_their_writers_are_gone(
    on_private_redis, private_redis, new_tenant, token, platform_token, eventually
):
    p, t, admin = on_private_redis(sites_asks_writers=False), Tenants.make(new_tenant, token), bearer(platform_token)
    held_everywhere(p, t, private_redis)
    private_redis.crash()
    make_changes(p, t, admin)
    for writer in p.writers:  # nothing can repair Redis or tell sites any more
        writer.process.terminate()
        writer.process.wait(15)
    private_redis.restart()
    assert '"STATE_ACTIVE"' in stored(private_redis, t.suspended, "state")  # Redis came back with the old values

    enforced_for_good(p.sites, t, eventually)


def test_changes_made_while_redis_hung_stay_enforced_after_it_answers_again(
    on_private_redis, private_redis, new_tenant, token, platform_token, eventually
):
    p, t, admin = on_private_redis(), Tenants.make(new_tenant, token), bearer(platform_token)
    held_everywhere(p, t, private_redis)
    private_redis.freeze()  # connections stay open, so nobody's subscription breaks
    try:
        make_changes(p, t, admin)
    finally:
        private_redis.thaw()

    enforced_for_good(p.sites, t, eventually)
    assert '"STATE_SUSPENDED"' in stored(private_redis, t.suspended, "state")
    undo_changes(p, t, admin, eventually)
