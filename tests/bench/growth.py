"""Growth: GetSite and ListSites p99 for one tenant with a handful of tenants in the platform,
then with 10,000 more tenants holding 1,000,000 sites between them (target: within 1.3x), and
what those tenants' state costs the sites process in memory.

The tenants and their sites go in as the database's administrator, each in one INSERT ...
SELECT (the registry's rows as CreateTenant leaves an ACTIVE tenant on the enterprise plan; no
service would create them in a bench's minute), then VACUUM (ANALYZE) and a CHECKPOINT: what
autovacuum and the checkpointer would do after such a load anyway, done before the measuring
rather than during it: an autovacuum of a million new rows, or a checkpoint writing them out,
during the "after" rounds would be the bulk load's aftermath, not the cost of the platform's
size (p99 after was 0.93x of before in one run and 2.33x in the next).
Then the users of 2,000 of the new tenants call ListSites once each (32 at a time), so
the sites process holds what a busy process holds for each tenant: its state and entitlements,
a token verification, rate and usage counters, metrics series. Its resident memory
(``VmRSS``) before and after, per tenant, times 10,000 is the memory figure (all 10,000 first
calls took over three minutes on the shared machine, past the bench's budget). The same calls
of ``bench_tenant`` are measured before and after, each as a few hundred calls in alternating
rounds of GetSite and ListSites.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
from grpc import aio
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as pb_grpc

from deploy.local.tokens import mint

from .bench_stack import BenchStack
from .latency import GET, site_stub
from .results import Figure, Results, ratio_at_most
from .timing import interleaved, ms, percentile, sequential

LIST = pb.ListSitesRequest(page_size=50)

_TENANTS = """
INSERT INTO tenant.tenants (tenant_id, display_name, state, plan, admin_email)
SELECT 'grow_' || lpad(g::text, 5, '0'), 'Grown tenant ' || g, 'STATE_ACTIVE', 'enterprise', 'admin@operator.example'
FROM generate_series(0, $1 - 1) AS g
"""
_SITES = """
INSERT INTO sites.sites (tenant_id, site_id, name, location, configuration)
SELECT 'grow_' || lpad((g % $2)::text, 5, '0'), 'S-' || lpad(g::text, 7, '0'), 'Grown site ' || g,
       jsonb_build_object('latitude', -1.28, 'longitude', 36.82, 'address', 'Plot ' || g,
                          'region', 'region-' || (g % 50), 'country_code', 'KE'),
       '{"equipment": [{"type": "rectifier", "count": 4}], "notes": "bench growth"}'::jsonb
FROM generate_series(1, $1) AS g
"""


def grown_tenant(index: int) -> str:
    return f"grow_{index:05d}"


async def _grow(admin_dsn: str, tenants: int, sites: int) -> float:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(admin_dsn)
    try:
        start = time.perf_counter()
        await conn.execute(_TENANTS, tenants)
        await conn.execute(_SITES, sites, tenants)
        # One statement each: VACUUM cannot run inside the implicit transaction of a multi-statement query.
        for statement in ("VACUUM (ANALYZE) tenant.tenants", "VACUUM (ANALYZE) sites.sites", "CHECKPOINT"):
            await conn.execute(statement)
        return time.perf_counter() - start
    finally:
        await conn.close()


async def _call_once_each(target: str, tokens: list[str]) -> int:
    """Each token's ListSites once, 32 at a time; the count of failed calls."""
    failed = 0
    queue = iter(tokens)
    async with aio.insecure_channel(target) as channel:
        stub = pb_grpc.SiteServiceStub(channel)

        async def client() -> None:
            nonlocal failed
            for token in queue:
                try:
                    await stub.ListSites(LIST, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
                except aio.AioRpcError:
                    failed += 1

        await asyncio.gather(*(client() for _ in range(32)))
    return failed


def resident_bytes(pid: int) -> int:
    """``VmRSS`` of ``pid`` and its children (worker processes, if any)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(child) for child in (task / "children").read_text().split()]
    total = 0
    for each in pids:
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def _p99s(bench: BenchStack, samples: int) -> dict[str, float]:
    md = bench.metadata("bench_tenant")
    with site_stub(bench.sites) as stub:
        rounds = {
            "GetSite": sequential(lambda: stub.GetSite(GET, metadata=md)),
            "ListSites(50)": sequential(lambda: stub.ListSites(LIST, metadata=md)),
        }
        return {name: ms(percentile(s, 0.99)) for name, s in interleaved(rounds, samples, 100).items()}


def bench_growth(bench: BenchStack, results: Results, samples: int, tenants: int, sites: int, callers: int) -> None:
    """``callers`` of the ``tenants`` new tenants make their first call (a sample: at 10,000, the
    first calls alone would take minutes on the shared machine); the memory per tenant is theirs."""
    results.section(f"Growth: {tenants:,} more tenants holding {sites:,} sites")
    small = _p99s(bench, samples)
    took = asyncio.run(_grow(bench.stack.database_url, tenants, sites))
    results.add(Figure(f"growth: {tenants:,} tenants and {sites:,} sites inserted, vacuumed, checkpointed", took, "s"))
    tokens = [mint(bench.stack.keys_dir, tenant=grown_tenant(i)) for i in range(0, tenants, tenants // callers)]
    sites_pid = bench.stack.processes["sites"].pid
    before = resident_bytes(sites_pid)
    start = time.perf_counter()
    failed = asyncio.run(_call_once_each(bench.sites, tokens))
    rate = len(tokens) / (time.perf_counter() - start)
    per_tenant = (resident_bytes(sites_pid) - before) / len(tokens)
    note = f"{failed} failed"
    results.add(Figure(f"first calls of {len(tokens):,} new tenants, 32 at a time", rate, "calls/s", note=note))
    results.add(Figure(f"sites process memory per tenant ({len(tokens):,} tenants' first calls)", per_tenant, "B"))
    note = f"{per_tenant:.0f} B x {tenants:,}, from the {len(tokens):,} measured"
    results.add(
        Figure(f"sites process memory for {tenants:,} tenants' state", per_tenant * tenants / 2**20, "MiB", note=note)
    )
    grown = _p99s(bench, samples)
    for name in small:
        results.add(Figure(f"{name} p99: a few tenants", small[name], "ms"))
        figure = f"{name} p99: {tenants:,} more tenants, {sites:,} sites"
        results.add(Figure(figure, grown[name], "ms", small[name], "a few tenants", ratio_at_most(1.3)))
