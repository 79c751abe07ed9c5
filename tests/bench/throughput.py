"""GetSite with 32 concurrent clients (one asyncio client process, this one): calls/s and p50.

The bare server, the sites service (one worker) and, when this checkout has ``SITES_WORKERS``,
a second sites instance with two workers. Each is run twice, in the order A B C then C B A,
half the time each, so a busy minute on the shared machine weighs on all of them alike.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from grpc import aio
from towerco.sites.v1 import sites_service_pb2_grpc as pb_grpc

from tests.support import free_port

from .bench_stack import BenchStack, workers_setting
from .latency import GET
from .results import Figure, Results, ratio_at_least
from .timing import ms, percentile, summary

CLIENTS = 32


@dataclass
class Load:
    calls: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0


async def _drive(target: str, metadata: tuple[tuple[str, str], ...], seconds: float, load: Load) -> None:
    async with aio.insecure_channel(target) as channel:
        stub = pb_grpc.SiteServiceStub(channel)
        for _ in range(20):
            await stub.GetSite(GET, metadata=metadata)
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    await stub.GetSite(GET, metadata=metadata, timeout=10)
                except aio.AioRpcError:
                    load.errors += 1
                    continue
                load.latencies.append(time.perf_counter() - start)
                load.calls += 1

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        load.seconds += time.perf_counter() - start


@contextmanager
def two_workers(bench: BenchStack) -> Iterator[str | None]:
    """A second sites instance with two worker processes on a port of its own, or None without the setting."""
    setting = workers_setting()
    if setting is None:
        yield None
        return
    port = free_port()
    env = {"SITES_PORT": str(port), setting: "2", "LOG_LEVEL": "WARNING", "MIGRATE_ON_START": "0"}
    bench.stack.start_service("sites", log=bench.log("sites-workers"), extra_env=env, instance="sites-workers")
    try:
        bench.stack.wait_serving("sites", port=port, instance="sites-workers")
        yield f"127.0.0.1:{port}"
    finally:
        bench.stack.stop("sites-workers")


def bench_throughput(bench: BenchStack, results: Results, seconds: float) -> None:
    results.section(f"GetSite, {CLIENTS} concurrent clients, {seconds:g} s each")
    md = bench.metadata("bench_tenant")
    with two_workers(bench) as workers:
        targets = {"bare": bench.bare, "sites": bench.sites}
        if workers:
            targets["sites x2 workers"] = workers
        loads = {name: Load() for name in targets}
        for order in (list(targets), list(reversed(targets))):
            for name in order:
                asyncio.run(_drive(targets[name], md, seconds / 2, loads[name]))
    for name, load in loads.items():
        print(f"  {name:<17} {load.rate:7.0f} calls/s  {summary(load.latencies)}  errors {load.errors}")
    bare, sites = loads["bare"], loads["sites"]
    results.add(Figure(f"GetSite x{CLIENTS}: bare server", bare.rate, "calls/s"))
    results.add(Figure(f"GetSite x{CLIENTS}: sites, 1 worker", sites.rate, "calls/s", bare.rate, "bare"))
    results.add(Figure(f"GetSite x{CLIENTS} p50: bare server", ms(percentile(bare.latencies, 0.5)), "ms"))
    p50 = ms(percentile(sites.latencies, 0.5))
    results.add(
        Figure(f"GetSite x{CLIENTS} p50: sites, 1 worker", p50, "ms", ms(percentile(bare.latencies, 0.5)), "bare")
    )
    if "sites x2 workers" in loads:
        two = loads["sites x2 workers"]
        note = "client process shares the 2 cores"
        target = ratio_at_least(1.6)
        results.add(
            Figure(f"GetSite x{CLIENTS}: sites, 2 workers", two.rate, "calls/s", sites.rate, "1 worker", target, note)
        )
        results.add(Figure(f"GetSite x{CLIENTS} p50: sites, 2 workers", ms(percentile(two.latencies, 0.5)), "ms"))
    else:
        print("  (no SITES_WORKERS setting in this checkout: no two-worker row)")
