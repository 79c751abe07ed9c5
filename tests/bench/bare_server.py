"""The floor the sites service is judged against: a bare grpc.aio server doing GetSite's transaction.

``python -m tests.bench.bare_server`` reads ``{"port", "dsn", "tenant_id", "pool_min", "pool_max"}``
as one JSON line on stdin (the DSN stays out of the process list), serves SiteService.GetSite
on 127.0.0.1, prints ``ready`` and runs until SIGTERM. No interceptors, no token check, no
cache, no limiter: each call is the transaction the sites service runs for GetSite (BEGIN
READ ONLY, bind the tenant, the same SELECT, COMMIT) on a pool of the service's size as
asyncpg's documentation writes it, and the row converted as the service converts it. The
tenant is fixed at start, since nothing here reads the caller's token.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any

import asyncpg
import grpc
from grpc import aio
from towerco.sites.v1 import sites_service_pb2 as pb

from services.runtime.db import BIND_TENANT
from services.sites import convert, queries

SERVICE = pb.DESCRIPTOR.services_by_name["SiteService"].full_name


async def json_columns(conn: asyncpg.Connection[Any]) -> None:
    """JSON columns arrive as Python values, as the services' pool decodes them."""
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def get_site(pool: asyncpg.Pool[Any], tenant_id: str, site_id: str) -> Any:
    """GetSite's transaction, the naive asyncpg way."""
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        await conn.execute(BIND_TENANT, tenant_id)
        return await conn.fetchrow(queries.GET_SITE, tenant_id, site_id)


class BareSites:
    def __init__(self, pool: asyncpg.Pool[Any], tenant_id: str) -> None:
        self._pool = pool
        self._tenant_id = tenant_id

    async def GetSite(self, request: pb.GetSiteRequest, ctx: aio.ServicerContext[Any, Any]) -> pb.Site:
        row = await get_site(self._pool, self._tenant_id, request.site_id)
        if row is None:
            await ctx.abort(grpc.StatusCode.NOT_FOUND, request.site_id)
        return convert.site_from_row(self._tenant_id, row)


async def serve(config: dict[str, Any]) -> None:
    pool = await asyncpg.create_pool(
        config["dsn"], min_size=config["pool_min"], max_size=config["pool_max"], init=json_columns
    )
    server = aio.server()
    # What add_SiteServiceServicer_to_server registers, for the one method served.
    get = grpc.unary_unary_rpc_method_handler(
        BareSites(pool, config["tenant_id"]).GetSite,
        request_deserializer=pb.GetSiteRequest.FromString,
        response_serializer=pb.Site.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"GetSite": get}),))
    server.add_insecure_port(f"127.0.0.1:{config['port']}")
    await server.start()
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    print("ready", flush=True)
    await stopping.wait()
    await server.stop(1)
    await pool.close()


if __name__ == "__main__":
    asyncio.run(serve(json.loads(sys.stdin.readline())))
