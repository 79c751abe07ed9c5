"""Growth: GetSite and ListSites p99 for one tenant with a handful of tenants' sites in the table,
then with 10,000 more tenants holding 1,000,000 sites between them (target: within 1.3x).

The rows go in as the database's administrator in one INSERT ... SELECT (no service would
create a million sites in a bench's minute), then ANALYZE, as autovacuum would after such a
load. The same calls of ``bench_tenant`` are measured before and after, each as a few
hundred calls in alternating rounds of GetSite and ListSites.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
from towerco.sites.v1 import sites_service_pb2 as pb

from .bench_stack import BenchStack
from .latency import GET, site_stub
from .results import Figure, Results, ratio_at_most
from .timing import interleaved, ms, percentile, sequential

TENANTS = 10_000
LIST = pb.ListSitesRequest(page_size=50)

_GROW = """
INSERT INTO sites.sites (tenant_id, site_id, name, location, configuration)
SELECT 'grow_' || lpad((g % $2)::text, 5, '0'), 'S-' || lpad(g::text, 7, '0'), 'Grown site ' || g,
       jsonb_build_object('latitude', -1.28, 'longitude', 36.82, 'address', 'Plot ' || g,
                          'region', 'region-' || (g % 50), 'country_code', 'KE'),
       '{"equipment": [{"type": "rectifier", "count": 4}], "notes": "bench growth"}'::jsonb
FROM generate_series(1, $1) AS g
"""


async def _grow(admin_dsn: str, sites: int) -> float:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(admin_dsn)
    try:
        start = time.perf_counter()
        await conn.execute(_GROW, sites, TENANTS)
        await conn.execute("ANALYZE sites.sites")
        return time.perf_counter() - start
    finally:
        await conn.close()


def _p99s(bench: BenchStack, samples: int) -> dict[str, float]:
    md = bench.metadata("bench_tenant")
    with site_stub(bench.sites) as stub:
        rounds = {
            "GetSite": sequential(lambda: stub.GetSite(GET, metadata=md)),
            "ListSites(50)": sequential(lambda: stub.ListSites(LIST, metadata=md)),
        }
        return {name: ms(percentile(s, 0.99)) for name, s in interleaved(rounds, samples, 100).items()}


def bench_growth(bench: BenchStack, results: Results, samples: int, sites: int) -> None:
    results.section(f"Growth: {TENANTS:,} more tenants holding {sites:,} sites")
    small = _p99s(bench, samples)
    took = asyncio.run(_grow(bench.stack.database_url, sites))
    results.add(Figure(f"growth: {sites:,} sites inserted and analysed", took, "s"))
    grown = _p99s(bench, samples)
    for name in small:
        results.add(Figure(f"{name} p99: a few tenants' sites", small[name], "ms"))
        figure = f"{name} p99: {TENANTS:,} tenants, {sites:,} sites"
        results.add(Figure(figure, grown[name], "ms", small[name], "a few tenants", ratio_at_most(1.3)))
