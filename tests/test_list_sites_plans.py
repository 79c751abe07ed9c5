"""ListSites reads only its page's rows however large the tenant, also once its prepared
statement's plan is generic (the pool's connections keep statements prepared; PostgreSQL
plans them generically after five calls): the plans, as the runtime role under RLS."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

from services.sites import queries

#: A tenant this large makes a plan that reads all of its rows, or a region's page that walks
#: every region's rows, cost hundreds of times a page's.
SITES = 20_000
REGIONS = 50
PAGE = 51  # the servicer asks for a page of 50 and one more

_SEED = """
INSERT INTO sites.sites (tenant_id, site_id, name, location, configuration)
SELECT $1, 'S-' || lpad(g::text, 6, '0'), 'Site ' || g,
       jsonb_build_object('region', 'region-' || (g % $3)), '{}'::jsonb
FROM generate_series(1, $2) AS g
"""


@pytest.fixture
async def large_tenant(admin: asyncpg.Connection[Any]) -> AsyncIterator[str]:
    tenant = f"plans_{uuid.uuid4().hex[:12]}"
    await admin.execute(_SEED, tenant, SITES, REGIONS)
    await admin.execute("ANALYZE sites.sites")
    try:
        yield tenant
    finally:
        await admin.execute("DELETE FROM sites.sites WHERE tenant_id = $1", tenant)


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


async def _generic_plan(
    conn: asyncpg.Connection[Any], tenant: str, statement: str, *args: object
) -> list[dict[str, Any]]:
    """The executed plan's nodes of ``statement`` prepared and planned generically, as the sites service runs it."""
    literals = ", ".join(_literal(a) for a in args)
    async with conn.transaction():
        await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", tenant)
        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        await conn.execute(f"PREPARE page AS {statement}")
        try:
            explained = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE page({literals})")
        finally:
            await conn.execute("DEALLOCATE page")
    return list(_nodes(json.loads(explained)[0]["Plan"]))


def _literal(value: object) -> str:
    if value is None:
        return "NULL"
    return str(value) if isinstance(value, int) else "'" + str(value).replace("'", "''") + "'"


def _rows_read(nodes: list[dict[str, Any]]) -> int:
    """Rows the scans of sites.sites produced plus those they read and threw away."""
    scans = [n for n in nodes if n.get("Relation Name") == "sites"]
    assert scans, f"no scan of sites.sites in {[n['Node Type'] for n in nodes]}"
    return sum(n["Actual Rows"] + n.get("Rows Removed by Filter", 0) for n in scans)


async def test_a_page_of_a_large_tenant_reads_only_its_rows_with_a_generic_plan(
    app_conn: asyncpg.Connection[Any], large_tenant: str
) -> None:
    nodes = await _generic_plan(app_conn, large_tenant, queries.LIST_SITES, large_tenant, "S-001000", PAGE)
    assert not [n for n in nodes if n["Node Type"] in ("Sort", "Bitmap Heap Scan")], nodes
    assert nodes[0]["Actual Rows"] == PAGE
    assert _rows_read(nodes) <= PAGE


async def test_a_region_page_of_a_large_tenant_reads_only_that_regions_rows_with_a_generic_plan(
    app_conn: asyncpg.Connection[Any], large_tenant: str
) -> None:
    region = "region-7"
    statement = queries.LIST_SITES_IN_REGION
    nodes = await _generic_plan(app_conn, large_tenant, statement, large_tenant, "S-001000", region, PAGE)
    assert nodes[0]["Actual Rows"] == PAGE
    # Walking the primary key and filtering would read about REGIONS rows per row answered.
    assert _rows_read(nodes) <= PAGE, [(n["Node Type"], n.get("Index Name")) for n in nodes]
