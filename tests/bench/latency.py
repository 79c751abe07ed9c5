"""GetSite p50, one client, sequential: the floors and the platform side by side, in alternating rounds.

- asyncpg alone: GetSite's transaction from this process, on a pool of the service's size;
- the bare server (``bare_server.py``): that transaction behind grpc.aio with no interceptors;
- the sites service, for a tenant whose rate is unlimited and for one with a finite rate
  (one rate decision per call);
- the gateway, gRPC (HTTP/2) and gRPC-web (HTTP/1.1 keep-alive, as a browser calls);
- a minimal Envoy written by hand (``envoy_cost.minimal``: the router alone, one HTTP/2
  cluster to the same sites service, the dev stack's command line): what Envoy's proxying
  alone adds on this machine, in the same rounds, so the gateway's row can be read against it.
  It is not a target's floor: the gateway's target stays "direct + 0.3 ms".
"""

from __future__ import annotations

import asyncio
import http.client
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import asyncpg
import grpc
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as pb_grpc

from .bare_server import get_site, json_columns
from .bench_stack import SITE_ID, BenchStack, pool_sizes
from .results import Figure, Results, above_floor_at_most, ratio_at_most
from .timing import Round, interleaved, ms, percentile, sample, sequential, summary

GET = pb.GetSiteRequest(site_id=SITE_ID)


@contextmanager
def site_stub(target: str, authority: str = "") -> Iterator[pb_grpc.SiteServiceStub]:
    """A blocking SiteService stub on ``target``; ``authority`` names the tenant's host at the gateway."""
    options = [("grpc.default_authority", authority)] if authority else []
    with grpc.insecure_channel(target, options=options) as channel:
        yield pb_grpc.SiteServiceStub(channel)


def tenant_host(tenant: str) -> str:
    return f"{tenant}.localhost"


@contextmanager
def asyncpg_alone(dsn: str, tenant_id: str) -> Iterator[Round]:
    """Rounds of GetSite's transaction straight from this process (its own loop and pool)."""
    loop = asyncio.new_event_loop()
    pool_min, pool_max = pool_sizes()

    async def connect() -> asyncpg.Pool[Any]:
        return await asyncpg.create_pool(dsn, min_size=pool_min, max_size=pool_max, init=json_columns)

    pool = loop.run_until_complete(connect())

    async def run(n: int) -> list[float]:
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            await get_site(pool, tenant_id, SITE_ID)
            samples.append(time.perf_counter() - start)
        return samples

    try:
        yield lambda n: loop.run_until_complete(run(n))
    finally:
        loop.run_until_complete(pool.close())
        loop.close()


@contextmanager
def grpc_web(port: int, tenant: str, token: str) -> Iterator[Callable[[], None]]:
    """One GetSite as a browser sends it (gRPC-web over HTTP/1.1, keep-alive), checked OK."""
    payload = GET.SerializeToString()
    body = b"\x00" + len(payload).to_bytes(4, "big") + payload
    headers = {
        "Host": f"{tenant_host(tenant)}:{port}",
        "Content-Type": "application/grpc-web+proto",
        "X-Grpc-Web": "1",
        "Authorization": f"Bearer {token}",
    }
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def call() -> None:
        connection.request("POST", "/towerco.sites.v1.SiteService/GetSite", body, headers=headers)
        reply = connection.getresponse()
        data = reply.read()
        assert reply.status == 200 and b"grpc-status:0" in data, data

    try:
        yield call
    finally:
        connection.close()


def bench_latency(bench: BenchStack, results: Results, samples: int) -> None:
    results.section("GetSite p50, one client, sequential (interleaved rounds of 100)")
    with ExitStack() as stack:
        md = bench.metadata("bench_tenant")
        limited_md = bench.metadata("bench_limited")
        bare = stack.enter_context(site_stub(bench.bare))
        sites = stack.enter_context(site_stub(bench.sites))
        gateway = stack.enter_context(site_stub(bench.gateway, tenant_host("bench_tenant")))
        # Imported here: envoy_cost imports this module for its stubs.
        from .envoy_cost import envoy

        _, minimal_port = stack.enter_context(envoy(bench, "minimal"))
        minimal = stack.enter_context(site_stub(f"127.0.0.1:{minimal_port}", tenant_host("bench_tenant")))
        rounds: dict[str, Round] = {
            "asyncpg": stack.enter_context(asyncpg_alone(bench.sites_dsn, "bench_tenant")),
            "bare": sequential(lambda: bare.GetSite(GET, metadata=md)),
            "unlimited": sequential(lambda: sites.GetSite(GET, metadata=md)),
            "limited": sequential(lambda: sites.GetSite(GET, metadata=limited_md)),
            "gateway": sequential(lambda: gateway.GetSite(GET, metadata=md)),
            "minimal envoy": sequential(lambda: minimal.GetSite(GET, metadata=md)),
            "grpc-web": sequential(
                stack.enter_context(grpc_web(bench.gateway_port, "bench_tenant", bench.tokens["bench_tenant"]))
            ),
        }
        taken = interleaved(rounds, samples, 100)
    p50 = {name: ms(percentile(s, 0.5)) for name, s in taken.items()}
    for name, s in taken.items():
        print(f"  {name:<13} {summary(s)}")
    labels = {
        "asyncpg": "asyncpg alone (floor 1)",
        "bare": "bare grpc.aio server (floor 2)",
        "unlimited": "sites, unlimited tenant",
        "limited": "sites, finite rate",
        "gateway": "through the gateway, gRPC",
        "grpc-web": "through the gateway, gRPC-web",
        "minimal envoy": "through a minimal Envoy (router only), gRPC",
    }
    asyncpg_floor, bare_floor = p50["asyncpg"], p50["bare"]
    targets = {
        "bare": (asyncpg_floor, "asyncpg alone", None),
        "unlimited": (bare_floor, "bare", ratio_at_most(1.15)),
        "limited": (bare_floor, "bare", ratio_at_most(1.25)),
        "gateway": (p50["unlimited"], "direct", above_floor_at_most(0.3)),
        "grpc-web": (p50["unlimited"], "direct", above_floor_at_most(0.3)),
        "minimal envoy": (p50["unlimited"], "direct", None),
    }
    for name, label in labels.items():
        floor, floor_name, target = targets.get(name, (None, "", None))
        results.add(Figure(f"GetSite p50: {label}", p50[name], "ms", floor, floor_name, target))
    for name, label in labels.items():
        results.add(Figure(f"GetSite p99: {label}", ms(percentile(taken[name], 0.99)), "ms"))


def bench_list_sites(bench: BenchStack, results: Results, samples: int) -> None:
    page = pb.ListSitesRequest(page_size=50)
    md = bench.metadata("bench_tenant")
    with site_stub(bench.sites) as sites:
        taken = sample(lambda: sites.ListSites(page, metadata=md), samples)
    results.add(Figure("ListSites(50) p50: sites, unlimited tenant", ms(percentile(taken, 0.5)), "ms"))
    results.add(Figure("ListSites(50) p99: sites, unlimited tenant", ms(percentile(taken, 0.99)), "ms"))
