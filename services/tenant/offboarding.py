"""Offboarding: a tenant in STATE_DELETING has its rows purged from every service.

Each data-owning service purges through its internal ``PurgeTenantData`` (idempotent),
then the registry removes its own rows except the tenant record, which stays in
STATE_DELETED, its tombstone: the id stays taken until ``tombstones.py`` removes it. Work
left unfinished by a restart is picked up again at start-up, and a service that cannot be
reached is retried.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from towerco.internal.v1 import tenant_data_pb2 as internal_pb
from towerco.internal.v1 import tenant_data_pb2_grpc as internal_grpc

from services.runtime import context
from services.runtime.db import Database
from services.runtime.tasks import KeyedTasks
from services.runtime.tenant_cache import TenantCache
from services.runtime.tenants import STATE_KIND

from . import queries, records, sso_config

log = logging.getLogger("towerco.tenant.offboarding")


class Offboarding:
    def __init__(
        self,
        db: Database,
        cache: TenantCache,
        owners: dict[str, internal_grpc.TenantDataServiceAsyncStub],
        *,
        retry_seconds: float = 2.0,
    ) -> None:
        self._db = db
        self._cache = cache
        self._owners = owners
        self._retry_seconds = retry_seconds
        self._tasks = KeyedTasks("offboard")

    def start(self, tenant_id: str) -> None:
        """Purge ``tenant_id`` in the background (once, however often it is asked)."""
        self._tasks.start(tenant_id, self._run(tenant_id))

    async def resume(self) -> None:
        """At start-up: finish every deletion a previous process left unfinished."""
        with context.bind(context.background_context("tenant", "offboarding.resume", uuid.uuid4().hex)):
            async with self._db.platform_read("offboarding.resume") as conn:
                rows = await conn.fetch(queries.TENANTS_IN_STATE, "STATE_DELETING")
        for row in rows:
            self.start(row["tenant_id"])

    async def close(self) -> None:
        await self._tasks.close()

    async def _run(self, tenant_id: str) -> None:
        ctx = context.background_context("tenant", "offboarding", f"offboard-{tenant_id}-{uuid.uuid4().hex[:8]}")
        with context.bind(ctx):
            for name, stub in self._owners.items():
                while True:
                    try:
                        reply = await stub.PurgeTenantData(
                            internal_pb.PurgeTenantDataRequest(tenant_id=tenant_id), timeout=30
                        )
                        log.info("tenant %s: %s purged %d rows", tenant_id, name, reply.row_count)
                        break
                    except Exception as exc:
                        log.warning("tenant %s: purge in %s failed (%s); retrying", tenant_id, name, exc)
                        await asyncio.sleep(self._retry_seconds)
            with context.platform_scope(tenant_id, "offboarding.finish"):
                async with self._db.transaction() as conn:
                    row = await conn.fetchrow(queries.GET_TENANT_FOR_UPDATE, tenant_id)
                    if row is None or row["state"] != "STATE_DELETING":
                        return
                    for statement in (
                        queries.DELETE_SETTINGS_BACKUPS,
                        queries.DELETE_SETTINGS,
                        queries.DELETE_USERS,
                        queries.DELETE_ROLES,
                        queries.DELETE_HOSTS,
                        sso_config.DELETE,  # its issuer is no longer taken
                    ):
                        await conn.execute(statement, tenant_id)
                    done = await conn.fetchrow(queries.SET_STATE, tenant_id, "STATE_DELETED", "")
            assert done is not None
            # Publish the settings as gone too, so no cache keeps serving the old ones.
            await self._cache.publish(
                tenant_id, done["version"], {STATE_KIND: records.state_value(done), records.SETTINGS_KIND: None}
            )
            log.info("tenant %s deleted", tenant_id)
