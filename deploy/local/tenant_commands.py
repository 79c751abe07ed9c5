"""``python -m deploy.local tenant-export | tenant-import``: the commands behind ``make tenant-export/-import``.

By default they use the dev stack's database and Redis (``DATABASE_URL`` / ``REDIS_URL``,
else the embedded servers of ``DATA_DIR``) and its settings key; elsewhere pass
``--database-url`` (the home cell's administrative DSN), ``--cell-database-url`` (the
tenant's cell's, when another) and ``--redis-url``, with ``SETTINGS_ENCRYPTION_KEYS``, ``CELLS``
and ``PLANS_FILE`` set as the services have them. See ``tenant_transfer.py`` (export) and
``tenant_import.py`` for what each does and refuses.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
from redis.exceptions import RedisError

from services.runtime.cells import CELLS, Cell
from services.runtime.environment import SettingsError, process_environment
from services.runtime.plans import Plans, PlansError, load_plans
from services.runtime.redis_clients import RedisConfig
from services.runtime.settings import PLANS_FILE, data_dir
from services.runtime.tenant_cache import TenantCache
from services.tenant.secrets import SecretBox, load_secret_box

from .stack import DATABASE, StackConfig
from .tenant_archive import ArchiveError, dump, load
from .tenant_import import check_placement, import_tenant, publish_tenant
from .tenant_transfer import TransferError, export_tenant, record_export

Connection: TypeAlias = "asyncpg.Connection[Any]"
#: How long the import waits for Redis to take the tenant's announcement before it says so.
PUBLISH_SECONDS = 5.0


def _dev_database_url() -> str:
    config = StackConfig.from_env(data_dir())
    return config.database_url or f"postgresql://postgres@127.0.0.1:{config.pg_port}/{DATABASE}"


def _dev_redis_url() -> str:
    config = StackConfig.from_env(data_dir())
    return config.redis_url or f"redis://127.0.0.1:{config.redis_port}/0"


def dev_cell_urls() -> dict[str, str]:
    """The dev stack's cells (``CELLS``) and each one's owner DSN, the home cell's included."""
    config = StackConfig.from_env(data_dir())
    urls = {config.cells[0].name: _dev_database_url()}
    for cell in config.cells[1:]:
        urls[cell.name] = f"postgresql://postgres@127.0.0.1:{config.cell_pg_port(cell.name)}/{DATABASE}"
    return urls


async def cell_of(database_url: str, tenant_id: str) -> str | None:
    """The cell the registry places ``tenant_id`` in (None: the home cell, or no such tenant)."""
    conn: Connection = await asyncpg.connect(database_url)
    try:
        cell: str | None = await conn.fetchval("SELECT cell FROM tenant.tenants WHERE tenant_id = $1", tenant_id)
    finally:
        await conn.close()
    return cell


@asynccontextmanager
async def _connections(database_url: str, cell_url: str) -> AsyncIterator[tuple[Connection, Connection | None]]:
    """The home cell's database, and the tenant's cell's when that is another one."""
    conn: Connection = await asyncpg.connect(database_url)
    try:
        if not cell_url or cell_url == database_url:
            yield conn, None
            return
        cell: Connection = await asyncpg.connect(cell_url)
        try:
            yield conn, cell
        finally:
            await cell.close()
    finally:
        await conn.close()


async def export_to_file(database_url: str, tenant_id: str, out: Path, cell_url: str = "") -> tuple[int, str]:
    """Write ``tenant_id``'s export to ``out`` (complete or not at all); (rows, sha256)."""
    async with _connections(database_url, cell_url) as (conn, cell):
        archive = await export_tenant(conn, tenant_id, cell)
        await asyncio.to_thread(_write_whole, out, dump(archive))
        await record_export(cell or conn, archive, out.name)  # the chain is in the tenant's cell
    return archive.row_count, archive.sha256


def _write_whole(out: Path, data: bytes) -> None:
    partial = out.with_name(f".{out.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, out)  # a reader never sees half a file


async def import_from_file(
    database_url: str,
    redis_url: str,
    data: bytes,
    target: str,
    box: SecretBox,
    cell_url: str = "",
    placement: str | None = None,
    rules: tuple[Sequence[Cell], Plans] | None = None,
) -> tuple[dict[str, int], str]:
    """Import the export ``data`` as tenant ``target`` (the file's own id when empty).

    Returns the rows written per table, and what became of telling the caches ("" when told).
    """
    archive = load(data)
    target = target or archive.tenant_id
    if rules is not None:
        check_placement(archive, placement, *rules)
    async with _connections(database_url, cell_url) as (conn, cell):
        written = await import_tenant(conn, archive, target, box, cell_conn=cell, placement=placement)
        untold = await _announce(conn, redis_url, target) if redis_url else "no Redis given"
    return written, untold


async def _announce(conn: Connection, redis_url: str, tenant_id: str) -> str:
    """Publish the imported tenant to the services' caches; why not, if it could not be."""
    cache = TenantCache(
        RedisConfig(redis_url, timeout_seconds=1.0, client_name="towerco-tenant-import"), local_seconds=0
    )
    try:
        await asyncio.wait_for(publish_tenant(conn, cache, tenant_id), PUBLISH_SECONDS)
    except (TimeoutError, RedisError, OSError) as exc:
        return f"Redis did not take the announcement ({exc or type(exc).__name__})"
    finally:
        await cache.close()
    return ""


def cmd_tenant_export(args: argparse.Namespace) -> int:
    out = Path(args.out or f"{args.tenant}.tenant-export.jsonl")
    try:
        database_url, cell_url = args.database_url, args.cell_database_url
        if not database_url:  # the dev stack: it knows where each of its cells is
            database_url = _dev_database_url()
            if not cell_url:
                cell = asyncio.run(cell_of(database_url, args.tenant))
                cell_url = dev_cell_urls().get(cell or "", "")
        rows, digest = asyncio.run(export_to_file(database_url, args.tenant, out, cell_url))
    except TransferError as exc:
        print(f"make tenant-export: {exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"make tenant-export: the database could not be read or the file written: {exc}", file=sys.stderr)
        return 2
    print(f"tenant {args.tenant}: {rows} rows -> {out} (sha256 {digest})", file=sys.stderr)
    return 0


def cmd_tenant_import(args: argparse.Namespace) -> int:
    database_url, cell_url = args.database_url, args.cell_database_url
    if not database_url:  # the dev stack: it knows where each of its cells is
        database_url = _dev_database_url()
        if args.cell and not cell_url:
            cell_url = dev_cell_urls().get(args.cell, "")
            if not cell_url:
                print(f"make tenant-import: the dev stack has no cell {args.cell!r} (CELLS)", file=sys.stderr)
                return 2
    redis_url = _dev_redis_url() if args.redis_url is None else args.redis_url
    try:
        data = Path(args.file).read_bytes()
    except OSError as exc:
        print(f"make tenant-import: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        env = process_environment()
        box = load_secret_box(env)
        rules = (CELLS.read(env), load_plans(PLANS_FILE.read(env)))  # what CreateTenant places by
        written, untold = asyncio.run(
            import_from_file(database_url, redis_url, data, args.tenant, box, cell_url, args.cell or None, rules)
        )
    except (ArchiveError, TransferError, SettingsError, PlansError) as exc:
        print(f"make tenant-import: {args.file}: {exc}; nothing was imported", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"make tenant-import: the database could not be reached ({exc}); nothing was imported", file=sys.stderr)
        return 2
    total = sum(written.values())
    tables = ", ".join(f"{table} {count}" for table, count in written.items())
    print(f"imported {total} rows from {args.file}: {tables}", file=sys.stderr)
    if untold:
        print(
            f"the services' tenant caches were not told: {untold}. A service that looked the id up before the "
            "import may answer it is unknown until its cached answer expires (TENANT_CACHE_SECONDS; an hour in Redis)",
            file=sys.stderr,
        )
    return 0


DATABASE_URL_HELP = "the home cell's administrative DSN (the registry's); default: the dev stack's"
CELL_URL_HELP = "the administrative DSN of the tenant's cell, when it is not the home cell; default: the dev stack's"


def add_tenant_commands(sub: Any) -> None:
    """The two subcommands, on ``python -m deploy.local``'s parser."""
    export = sub.add_parser("tenant-export", help="write one tenant's rows of every service to one file")
    export.add_argument("--tenant", required=True)
    export.add_argument("--out", default="", help="the file; default <tenant>.tenant-export.jsonl")
    export.add_argument("--database-url", default="", help=DATABASE_URL_HELP)
    export.add_argument("--cell-database-url", default="", help=CELL_URL_HELP)
    export.set_defaults(func=cmd_tenant_export)
    restore = sub.add_parser("tenant-import", help="restore a tenant export into an unused tenant id")
    restore.add_argument("--file", required=True)
    restore.add_argument("--tenant", default="", help="the tenant id to create; default: the file's own")
    restore.add_argument("--database-url", default="", help=DATABASE_URL_HELP)
    restore.add_argument(
        "--cell", default="", help="the cell to place the tenant in (its rows' database); default: home"
    )
    restore.add_argument("--cell-database-url", default="", help=CELL_URL_HELP)
    restore.add_argument("--redis-url", default=None, help="where the tenant caches are; '' to skip; default: dev's")
    restore.set_defaults(func=cmd_tenant_import)
