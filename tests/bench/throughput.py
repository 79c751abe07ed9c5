"""GetSite with 32 concurrent clients (one asyncio client process, this one): calls/s and p50.

The bare server, the sites service (one worker) and, when this checkout has ``SITES_WORKERS``,
a second sites instance with two workers. Each is run twice, in the order A B C then C B A,
half the time each, so a busy minute on the shared machine weighs on all of them alike.

Here the client process shares the 2 cores with the servers, so a second worker has no core of
its own and the measured calls/s cannot show what workers are for. What can be measured here is
each instance's CPU per call (the service's processes, workers and parent summed, from
``/proc/<pid>/stat`` before and after): a worker that has a core to itself serves at most
1 / (CPU per call) calls a second, so the capacity of n workers on n free cores is
n / (CPU per call), and the two-worker target is judged on that projection, labelled as such.
It holds only if a second worker does not make each call dearer (contention, a lock, a shared
pool's waits), which is exactly what the CPU per call with two workers shows.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

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
    #: CPU seconds the serving processes spent meanwhile (None: not measured, the bare server).
    cpu: float | None = None

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_call(self) -> float | None:
        return self.cpu / self.calls if self.cpu is not None and self.calls else None


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of ``pid`` and its children (worker processes), so far."""
    pids, total = [pid], 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(child) for child in (task / "children").read_text().split()]
    for each in pids:
        fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


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
        pids = {"sites": bench.stack.processes["sites"].pid}
        if workers:
            targets["sites x2 workers"] = workers
            pids["sites x2 workers"] = bench.stack.processes["sites-workers"].pid
        loads = {name: Load(cpu=0.0 if name in pids else None) for name in targets}
        for order in (list(targets), list(reversed(targets))):
            for name in order:
                load, pid = loads[name], pids.get(name)
                before = cpu_seconds(pid) if pid else 0.0
                asyncio.run(_drive(targets[name], md, seconds / 2, load))
                if pid and load.cpu is not None:
                    load.cpu += cpu_seconds(pid) - before
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
        note = "measured; the client process shares the 2 cores, so not judged: see the capacity row"
        name = f"GetSite x{CLIENTS}: sites, 2 workers"
        results.add(Figure(name, two.rate, "calls/s", sites.rate, "1 worker", note=note))
        results.add(Figure(f"GetSite x{CLIENTS} p50: sites, 2 workers", ms(percentile(two.latencies, 0.5)), "ms"))
        one_cpu, two_cpu = sites.cpu_per_call, two.cpu_per_call
        if one_cpu and two_cpu:
            results.add(Figure(f"GetSite x{CLIENTS}: sites CPU per call, 1 worker", one_cpu * 1e6, "us"))
            name = f"GetSite x{CLIENTS}: sites CPU per call, 2 workers"
            results.add(Figure(name, two_cpu * 1e6, "us", one_cpu * 1e6, "1 worker"))
            note = "projected: n workers on n free cores serve n / (CPU per call); the CPU per call measured here"
            results.add(
                Figure(
                    "GetSite capacity on free cores: sites, 2 workers",
                    2 / two_cpu,
                    "calls/s",
                    1 / one_cpu,
                    "1 worker",
                    ratio_at_least(1.6),
                    note,
                )
            )
    else:
        print("  (no SITES_WORKERS setting in this checkout: no two-worker row)")
