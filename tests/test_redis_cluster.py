"""Rate limits, tenant caches and their invalidation on a real three-master Redis Cluster.

A registry, a feature gate and a sites process of the module's own use a Cluster started
from Debian's ``redis-server`` (``REDIS_URL=redis+cluster://...``), with the session's
database. The writers list node 0 first, sites node 2, so sites listens on another node
than the one the writers publish to. Tenants are chosen so that their hash slots fall on
each of the three masters, and every key is looked for on the master its slot says.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError
from towerco.features.v1 import feature_gate_service_pb2 as features_pb
from towerco.features.v1 import feature_gate_service_pb2_grpc as features_grpc
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb
from towerco.tenant.v1 import tenant_registry_service_pb2_grpc as tenant_grpc

from deploy.local.stack import Stack
from services.runtime.environment import SettingsError
from services.runtime.ratelimit import Decision, LimiterConfig, RateLimiter, rate_key
from services.runtime.redis_clients import ClusterUnavailableError, RedisConfig, command_client, subscriber_client
from services.runtime.redis_url import ClusterAddress, cluster_address
from services.runtime.settings import REDIS_URL
from services.runtime.tenant_cache import CHANNEL, redis_key

from .support import bearer, expect_error, free_port
from .support.processes import ExtraService, ExtraServices
from .support.redis_cluster import LocalRedisCluster

REPO = Path(__file__).resolve().parents[1]
ANALYTICS = sites_pb.GetSiteAnalyticsRequest()
#: Longer than the module lasts: sites sees a change only if it is told.
TRUST_MEMORY_SECONDS = 600


def test_a_redis_cluster_url_makes_cluster_clients_and_a_plain_url_does_not() -> None:
    url = "redis+cluster://app:s%40cret@10.0.0.1:7000,[::1]:7001,redis-2/0"
    assert cluster_address(url) == ClusterAddress(
        (("10.0.0.1", 7000), ("::1", 7001), ("redis-2", 6379)), username="app", password="s@cret"
    )
    assert cluster_address("redis://127.0.0.1:6379/0") is None
    assert isinstance(command_client(RedisConfig(url), "test"), RedisCluster)
    standalone = command_client(RedisConfig("redis://127.0.0.1:6379/0"), "test")
    assert isinstance(standalone, aioredis.Redis)
    # The subscriber of a Cluster is a plain connection to one node (classic pub/sub reaches every node).
    subscriber = subscriber_client(RedisConfig(url), "test")
    assert isinstance(subscriber, aioredis.Redis)
    assert subscriber.connection_pool.connection_kwargs["nodes"][0] == ("10.0.0.1", 7000)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis+cluster://10.0.0.1:7000/1", "database 0"),
        ("redis+cluster://10.0.0.1:7000?ssl=true", "database 0"),
        ("redis+cluster://10.0.0.1:port", "is not host:port"),
        ("redis+cluster://10.0.0.1:7000,,10.0.0.2:7000", "is not host:port"),
    ],
)
def test_a_cluster_url_a_client_cannot_use_refuses_to_start(url: str, complaint: str) -> None:
    with pytest.raises(SettingsError, match=complaint) as refusal:
        REDIS_URL.read({"REDIS_URL": url})
    assert str(refusal.value).startswith("REDIS_URL: ")


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRedisCluster]:
    nodes = LocalRedisCluster(REPO / "test-output" / f"redis-cluster-{uuid.uuid4().hex[:8]}")
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


@dataclass
class OnCluster:
    registry: Any
    gate: Any
    sites: Any
    sites_process: ExtraService


@pytest.fixture(scope="module")
def on_cluster(
    stack: Stack, cluster: LocalRedisCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OnCluster]:
    services = ExtraServices(stack, tmp_path_factory.mktemp("redis-cluster-services"))
    writers_env = {"REDIS_URL": cluster.url(first=0)}
    with ExitStack() as opened:
        try:
            # Started together, then waited for: three start-ups cost one.
            registry = services.start("tenant", writers_env, wait=False)
            gate = services.start("features", writers_env, wait=False)
            sites = services.start(
                "sites",
                {
                    "REDIS_URL": cluster.url(first=2),
                    "TENANT_CACHE_SECONDS": str(TRUST_MEMORY_SECONDS),
                    "TENANT_TARGET": registry.target,
                    "FEATURES_TARGET": gate.target,
                },
                wait=False,
            )
            for name, service in (("tenant", registry), ("features", gate), ("sites", sites)):
                port = int(service.target.rsplit(":", 1)[1])
                stack.wait_serving(name, port=port, instance=f"{name}-{port}")
            channels = [opened.enter_context(grpc.insecure_channel(p.target)) for p in (registry, gate, sites)]
            yield OnCluster(
                tenant_grpc.TenantRegistryServiceStub(channels[0]),
                features_grpc.FeatureGateServiceStub(channels[1]),
                sites_grpc.SiteServiceStub(channels[2]),
                sites,
            )
        finally:
            for process in services.started:  # all drain at once, then each is waited for
                process.terminate()
            services.stop()


def tenants_on_every_master(cluster: LocalRedisCluster) -> dict[int, str]:
    """A fresh tenant id per master (by port) whose keys' slot that master owns (CLUSTER KEYSLOT)."""
    chosen: dict[int, str] = {}
    run = uuid.uuid4().hex[:8]
    for n in range(200):
        tenant = f"rc_{run}_{n}"
        chosen.setdefault(cluster.owner(rate_key(tenant, "read")).port, tenant)
        if len(chosen) == len(cluster.nodes):
            return chosen
    raise AssertionError(f"no tenant ids on every master: {chosen}")


def key_holders(cluster: LocalRedisCluster, key: str) -> list[int]:
    """The ports of the nodes that hold ``key`` themselves (asked one by one, no redirects)."""
    holders = []
    for node in cluster.nodes:
        with node.client() as client:
            try:
                if client.exists(key):
                    holders.append(node.port)
            except MovedError:  # not this node's slot
                pass
    return holders


def test_each_tenants_rate_limit_is_decided_on_the_master_its_slot_names(
    on_cluster: OnCluster, cluster: LocalRedisCluster, token: Callable[..., str], platform_token: str
) -> None:
    for port, tenant in tenants_on_every_master(cluster).items():
        md = bearer(token(tenant))  # provisions it
        on_cluster.gate.SetLimitOverride(
            features_pb.SetLimitOverrideRequest(tenant_id=tenant, resource="rpm_read", limit=60),
            metadata=bearer(platform_token),
            timeout=10,
        )
        admitted = 0
        while admitted < 40:
            try:
                on_cluster.sites.ListSites(LIST, metadata=md, timeout=10)
            except grpc.RpcError:
                break
            admitted += 1
        error = expect_error(on_cluster.sites.ListSites, LIST, metadata=md)
        assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"), error
        # One a second with ten seconds of burst, decided by GCRA in Redis: alone, this process
        # would have admitted a quarter of the rate (2 or 3 calls) and written nothing there.
        assert 10 <= admitted < 40, admitted
        assert key_holders(cluster, rate_key(tenant, "read")) == [port]
    for node in cluster.nodes:
        with node.client() as client:
            assert int(client.dbsize()) > 0, node.port
    assert "Redis unavailable" not in on_cluster.sites_process.output()


def test_tenant_cache_values_are_written_and_read_on_the_master_their_slot_names(
    on_cluster: OnCluster, cluster: LocalRedisCluster, token: Callable[..., str]
) -> None:
    for port, tenant in tenants_on_every_master(cluster).items():
        on_cluster.sites.ListSites(LIST, metadata=bearer(token(tenant)), timeout=10)
        for kind, expected in (("state", '"STATE_ACTIVE"'), ("entitlements", '"enterprise"')):
            key = redis_key(tenant, kind)
            assert key_holders(cluster, key) == [port], key
            with cluster.node(port).client() as client:
                value = client.get(key)
            assert value is not None and expected in value.decode(), value
    assert "Redis unavailable" not in on_cluster.sites_process.output()


def test_a_suspension_and_a_plan_change_reach_sites_listening_on_another_node_within_a_second(
    on_cluster: OnCluster,
    cluster: LocalRedisCluster,
    new_tenant: Callable[..., str],
    token: Callable[..., str],
    platform_token: str,
    eventually: Callable[..., Any],
) -> None:
    suspended, downgraded = new_tenant(plan="professional"), new_tenant(plan="professional")
    md = {tenant: bearer(token(tenant)) for tenant in (suspended, downgraded)}
    for tenant_md in md.values():  # sites holds both as active professionals, for longer than this test
        on_cluster.sites.GetSiteAnalytics(ANALYTICS, metadata=tenant_md, timeout=10)
    published_before = publishes_by_node(cluster)
    admin = bearer(platform_token)

    on_cluster.registry.SuspendTenant(
        tenant_pb.SuspendTenantRequest(tenant_id=suspended, reason="cluster test"), metadata=admin, timeout=10
    )
    eventually(lambda: refused_with(on_cluster.sites, md[suspended], "TENANT_SUSPENDED"), within=1.0)
    on_cluster.gate.SetTenantPlan(
        features_pb.SetTenantPlanRequest(tenant_id=downgraded, plan="basic"), metadata=admin, timeout=10
    )
    eventually(lambda: refused_with(on_cluster.sites, md[downgraded], "FEATURE_NOT_IN_PLAN"), within=1.0)

    # The writers published on one node; sites heard it on another, over the cluster bus.
    published_on = {port for port, count in publishes_by_node(cluster).items() if count > published_before[port]}
    listening_on = subscriber_nodes(cluster, on_cluster.sites_process.process.pid)
    assert listening_on == {cluster.nodes[2].port}, listening_on
    assert published_on and not published_on & listening_on, (published_on, listening_on)
    with cluster.owner(redis_key(suspended, "state")).client() as client:
        value = client.get(redis_key(suspended, "state"))
    assert value is not None and b"STATE_SUSPENDED" in value, value


def test_a_subscriber_whose_node_is_unreachable_subscribes_on_the_next_one(cluster: LocalRedisCluster) -> None:
    closed = free_port()
    listed = cluster.nodes[1].port
    config = RedisConfig(f"redis+cluster://127.0.0.1:{closed},127.0.0.1:{listed}", client_name="towerco-test")

    async def attempts() -> list[str]:
        subscriber = subscriber_client(config, "rotation")
        outcomes = []
        try:
            for _ in range(2):
                try:
                    async with subscriber.pubsub() as pubsub:
                        await pubsub.subscribe(CHANNEL)
                        outcomes.append(f"subscribed on {pubsub.connection.port}")
                except RedisConnectionError as exc:
                    outcomes.append(f"failed: {exc}")
        finally:
            await subscriber.aclose()
        return outcomes

    first, second = asyncio.run(attempts())
    assert first.startswith("failed") and f":{closed}" in first, first
    assert second == f"subscribed on {listed}", second


def test_a_command_client_of_a_cluster_holds_its_bound_and_queues_what_exceeds_it(cluster: LocalRedisCluster) -> None:
    # The client reads the slot map from node 2 alone and the command table from node 0 (the
    # first master), on connections besides the bounded ones: the keys are on node 1.
    start = f"redis+cluster://127.0.0.1:{cluster.nodes[2].port}"
    config = RedisConfig(start, timeout_seconds=2.0, max_connections=2, client_name="towerco-test")
    owner = cluster.nodes[1]
    key = next(key for key in (f"bound:{{{n}}}:" for n in range(1000)) if cluster.owner(key) is owner)

    async def burst() -> tuple[list[Any], list[str]]:
        client = command_client(config, "burst")
        try:
            answers = await asyncio.gather(*(client.set(f"{key}{i}", i) for i in range(30)))
            with owner.client() as admin:  # before the client closes its connections
                names = [c["name"] for c in admin.client_list()]
            return answers, names
        finally:
            await client.aclose()

    # Thirty at once to one node: the cluster client alone would fail past its pool (MaxConnectionsError).
    answers, names = asyncio.run(burst())
    assert answers == [True] * 30
    assert 1 <= names.count("towerco-test/burst") <= 2, names


@pytest.mark.stack  # it connects, to a closed port
def test_an_unreachable_cluster_is_a_connection_error_so_the_rate_limiter_decides_locally() -> None:
    config = RedisConfig(f"redis+cluster://127.0.0.1:{free_port()}", timeout_seconds=0.5)

    async def ask() -> tuple[BaseException | None, Decision]:
        client = command_client(config, "unreachable")
        limiter = RateLimiter(config, LimiterConfig())
        try:
            try:
                await client.get("ratelimit:{t}:read")
            except RedisConnectionError as exc:
                refused: BaseException | None = exc
            else:
                refused = None
            return refused, await limiter.decide("t_unreachable", "read", 60)
        finally:
            await client.aclose()
            await limiter.close()

    refused, decision = asyncio.run(ask())
    assert isinstance(refused, ClusterUnavailableError), refused  # not redis-py's RedisClusterException
    assert decision == Decision(True, local=True)


LIST = sites_pb.ListSitesRequest(page_size=1)


def refused_with(stub: Any, md: Any, reason: str) -> None:
    error = expect_error(stub.GetSiteAnalytics, ANALYTICS, metadata=md)
    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, reason), error


def publishes_by_node(cluster: LocalRedisCluster) -> dict[int, int]:
    """PUBLISH commands each node has served (INFO commandstats)."""
    counts = {}
    for node in cluster.nodes:
        with node.client() as client:
            stats = client.info("commandstats")
        counts[node.port] = int(stats.get("cmdstat_publish", {}).get("calls", 0))
    return counts


def subscriber_nodes(cluster: LocalRedisCluster, pid: int) -> set[int]:
    """The nodes where the process's cache subscribers are connected (CLIENT LIST names them)."""
    ports = set()
    for node in cluster.nodes:
        with node.client() as client:
            names = [c["name"] for c in client.client_list()]
        if any(name.startswith(f"towerco-sites/{pid}/") and name.endswith("-subscriber") for name in names):
            ports.add(node.port)
    return ports
