"""Growth: GetSite and ListSites p99 of one tenant on a platform of a handful of tenants, side by
side with the same calls on one of 10,000 more tenants holding 1,000,000 sites (target: within
1.3x), and what those tenants' state costs a sites process in memory.

Both sides run at once, on the same PostgreSQL server and the same services but the sites
process: the bench's own sites process and database (a handful of tenants, a few hundred sites)
and a second sites process ("grown") on a database of its own in the same server, where
``bench_tenant``'s sites are created through it as on the first, then the million sites of
the new tenants go in. Their calls alternate one by one, so every second's load on the
shared machine falls on both sides alike, and each ratio's note gives its bootstrap interval:
a p99 of 2,000 calls is the 20th slowest, partly luck on a loaded machine. Measured one after
the other (a few tenants, then the load, then the grown platform a minute later), three full
runs gave p99 ratios of 0.83x to 1.68x with the same code: the minutes differed, not the
platforms; in one such run with every full garbage collection of the sites process logged,
none fell in the later rounds while their p99 was twice the earlier one's.

The new tenants (the registry's rows as CreateTenant leaves an ACTIVE tenant on the
enterprise plan; no service would create them in a bench's minute) and their sites go in as
the database's administrator, each in one INSERT ... SELECT, then VACUUM (ANALYZE) (of both
sides' tables) and a CHECKPOINT: what autovacuum and the checkpointer would do after such a load anyway, done
before the measuring rather than during it (their work during the rounds would be the bulk
load's aftermath, not the cost of the platform's size). Then the users of 2,000 of the new
tenants call ListSites once each on the grown process (32 at a time), so that it holds what a
busy process holds for each tenant: its state and entitlements, a token verification, rate
and usage counters, metrics series. Its resident memory (``VmRSS``) before and after, per
tenant, times 10,000 is the memory figure (all 10,000 first calls took over three minutes on
the shared machine, past the bench's budget).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from grpc import aio
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as pb_grpc

from deploy.local.dsn import runtime_dsn
from deploy.local.stack import service_spec
from deploy.local.tokens import mint
from services.runtime.server import migrate_service
from services.runtime.settings import DATABASE_URLS, LOG_LEVEL, PORTS
from tests.support import free_port

from .bench_stack import BenchStack, create_sites, workers_setting
from .latency import GET, site_stub
from .results import Figure, Results, ratio_at_most
from .timing import interleaved, ms, percentile, ratio_interval, sequential

LIST = pb.ListSitesRequest(page_size=50)
#: The grown side's database, in the bench's PostgreSQL server, and its sites process.
GROWN_DATABASE = "towerco_grown"
GROWN = "sites-grown"
#: Calls of each series per round: one, so that a burst of the shared machine's load (a
#: fraction of a second) falls on both sides alike; in rounds of 50 (0.1-0.5 s) one side's
#: p99 could catch a burst the other missed (ratios 0.63x-1.26x at a load of 9-18).
ROUND = 1

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


def database_named(dsn: str, database: str) -> str:
    """``dsn`` with its database replaced by ``database``."""
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


@dataclass(frozen=True)
class GrownSide:
    """The second sites process and its database (the administrator's DSN)."""

    admin_dsn: str
    target: str
    pid: int


@contextmanager
def grown_sites(bench: BenchStack) -> Iterator[GrownSide]:
    """A second sites process on a database of its own in the bench's PostgreSQL server, migrated
    as the first, with ``bench_tenant``'s sites created through it as they were on the first."""
    stack = bench.stack
    admin_dsn = database_named(stack.database_url, GROWN_DATABASE)
    asyncio.run(_create_database(stack.database_url, GROWN_DATABASE))
    asyncio.run(migrate_service(service_spec("sites"), admin_dsn, stack.app_db_password))
    port = free_port()
    env = {
        LOG_LEVEL.name: "WARNING",
        PORTS["sites"].name: str(port),
        DATABASE_URLS["sites"].name: runtime_dsn(admin_dsn, "sites", stack.app_db_password),
    }
    if workers := workers_setting():
        env[workers] = "1"
    process = stack.start_service("sites", log=bench.log(GROWN), extra_env=env, instance=GROWN)
    try:
        stack.wait_serving("sites", port=port, instance=GROWN)
        target = f"127.0.0.1:{port}"
        create_sites(bench, target, "bench_tenant")
        yield GrownSide(admin_dsn, target, process.pid)
    finally:
        stack.stop(GROWN)


async def _create_database(admin_dsn: str, name: str) -> None:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _grow(registry_dsn: str, sites_dsn: str, tenants: int, sites: int) -> float:
    """The tenants into the registry, their sites into the grown side's database; both databases'
    tables vacuumed, so the few tenants' side reads a table in the same state as the grown one."""
    start = time.perf_counter()
    loads = (
        (registry_dsn, _TENANTS, (tenants,), ("tenant.tenants", "sites.sites")),
        (sites_dsn, _SITES, (sites, tenants), ("sites.sites",)),
    )
    for dsn, statement, args, tables in loads:
        conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn)
        try:
            await conn.execute(statement, *args)
            # One statement each: VACUUM cannot run inside the implicit transaction of a multi-statement query.
            for table in tables:
                await conn.execute(f"VACUUM (ANALYZE) {table}")
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()
    return time.perf_counter() - start


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


def _p99s(bench: BenchStack, grown: GrownSide, samples: int) -> dict[str, dict[str, list[float]]]:
    """Each call's times on the few tenants' side and on the grown side, the four series alternating."""
    md = bench.metadata("bench_tenant")
    with site_stub(bench.sites) as few, site_stub(grown.target) as many:
        rounds = {
            "GetSite few": sequential(lambda: few.GetSite(GET, metadata=md)),
            "GetSite grown": sequential(lambda: many.GetSite(GET, metadata=md)),
            "ListSites(50) few": sequential(lambda: few.ListSites(LIST, metadata=md)),
            "ListSites(50) grown": sequential(lambda: many.ListSites(LIST, metadata=md)),
        }
        times = interleaved(rounds, samples, ROUND)
    return {name: {side: times[f"{name} {side}"] for side in ("few", "grown")} for name in ("GetSite", "ListSites(50)")}


def bench_growth(bench: BenchStack, results: Results, samples: int, tenants: int, sites: int, callers: int) -> None:
    """``callers`` of the ``tenants`` new tenants make their first call (a sample: at 10,000, the
    first calls alone would take minutes on the shared machine); the memory per tenant is theirs."""
    results.section(f"Growth: {tenants:,} more tenants holding {sites:,} sites, side by side with a few")
    with grown_sites(bench) as grown:
        took = asyncio.run(_grow(bench.stack.database_url, grown.admin_dsn, tenants, sites))
        what = f"growth: {tenants:,} tenants and {sites:,} sites inserted, vacuumed, checkpointed"
        results.add(Figure(what, took, "s"))
        tokens = [mint(bench.stack.keys_dir, tenant=grown_tenant(i)) for i in range(0, tenants, tenants // callers)]
        before = resident_bytes(grown.pid)
        start = time.perf_counter()
        failed = asyncio.run(_call_once_each(grown.target, tokens))
        rate = len(tokens) / (time.perf_counter() - start)
        per_tenant = (resident_bytes(grown.pid) - before) / len(tokens)
        note = f"{failed} failed"
        results.add(Figure(f"first calls of {len(tokens):,} new tenants, 32 at a time", rate, "calls/s", note=note))
        results.add(Figure(f"sites process memory per tenant ({len(tokens):,} tenants' first calls)", per_tenant, "B"))
        note = f"{per_tenant:.0f} B x {tenants:,}, from the {len(tokens):,} measured"
        memory = per_tenant * tenants / 2**20
        results.add(Figure(f"sites process memory for {tenants:,} tenants' state", memory, "MiB", note=note))
        times = _p99s(bench, grown, samples)
    for name, sides in times.items():
        few, many = (ms(percentile(sides[side], 0.99)) for side in ("few", "grown"))
        low, high = ratio_interval(sides["grown"], sides["few"], 0.99)
        results.add(Figure(f"{name} p99: a few tenants", few, "ms", note=f"n={samples}, the four series alternating"))
        note = f"n={samples}; 90% of bootstrap resamples {low:.2f}x-{high:.2f}x"
        figure = f"{name} p99: {tenants:,} more tenants, {sites:,} sites"
        results.add(Figure(figure, many, "ms", few, "a few tenants", ratio_at_most(1.3), note=note))
