"""towerco.audit.v1.AuditLogService: append to tenants' hash chains, list and verify them."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import asyncpg
from grpc import aio
from towerco.audit.v1 import audit_log_service_pb2 as pb
from towerco.audit.v1 import audit_log_service_pb2_grpc as pb_grpc

from services.runtime import cells, context
from services.runtime.errors import ErrorReason, FieldViolation, ServiceError, invalid_argument, not_found, unavailable
from services.runtime.pagination import page_size
from services.runtime.scope import target_tenant
from services.runtime.server import Runtime
from services.runtime.validation import Violations

from . import convert, queries
from .hash_chain import ChainCheck, ChainedEvent

Ctx = aio.ServicerContext[Any, Any]

#: Events VerifyChain reads (and hashes, off the event loop) at a time.
VERIFY_BATCH = 1000


class AuditLogServicer(pb_grpc.AuditLogServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._db = runtime.db
        self._tokens = runtime.page_tokens
        self._tenants = runtime.tenants

    async def WriteEvents(self, request: pb.WriteEventsRequest, ctx: Ctx) -> pb.WriteEventsResponse:
        events = convert.new_events(request.events, received=datetime.now(UTC))
        by_tenant: dict[str, list[convert.NewEvent]] = defaultdict(list)
        for event in events:
            by_tenant[event.tenant_id].append(event)
        by_cell: dict[str, list[str]] = defaultdict(list)
        for tenant_id in sorted(by_tenant):
            by_cell[await self._db.cell_of(tenant_id)].append(tenant_id)
        written = 0
        # One transaction per cell (almost always one: a batch comes from one cell's outbox, except the
        # registry's): its events are all written, or none is; a failure is retried whole, and events
        # already written are recognised by their ids. Tenants are locked in sorted order, so concurrent
        # batches never wait on each other in a cycle.
        for cell, tenant_ids in by_cell.items():
            with cells.on_cell(cell):
                async with self._db.transaction() as conn:
                    for tenant_id in tenant_ids:
                        await self._db.rebind_tenant(conn, tenant_id, "audit.write_events")
                        written += await _append(conn, tenant_id, by_tenant[tenant_id])
        return pb.WriteEventsResponse(written=written)

    async def ListEvents(self, request: pb.ListEventsRequest, ctx: Ctx) -> pb.ListEventsResponse:
        v = Violations()
        v.text("action", request.action, max_len=convert.MAX_ACTION)
        v.text("resource", request.resource, max_len=convert.MAX_RESOURCE)
        v.text("user_id", request.user_id, max_len=convert.MAX_USER_ID)
        start = convert.time_filter(v, "start_time", request.start_time if request.HasField("start_time") else None)
        end = convert.time_filter(v, "end_time", request.end_time if request.HasField("end_time") else None)
        if start is not None and end is not None and end <= start:
            v.add("end_time", "must be after start_time")
        v.raise_if_any()
        size = page_size(request.page_size)
        tenant_id = context.current_tenant()
        query = {
            "action": request.action,
            "resource": request.resource,
            "user_id": request.user_id,
            "start_time": start.isoformat() if start else "",
            "end_time": end.isoformat() if end else "",
        }
        position = self._tokens.decode(request.page_token, tenant_id, query)
        before = None
        if position is not None:
            before = position.get("before")
            if not isinstance(before, int):
                raise invalid_argument(
                    [FieldViolation("page_token", "page token is not a page token from this API")],
                    reason=ErrorReason.INVALID_PAGE_TOKEN,
                )
        sql, args = queries.list_events(
            before=before, action=request.action, resource=request.resource, user_id=request.user_id,
            start_time=start, end_time=end,
        )  # fmt: skip
        async with self._db.transaction(readonly=True) as conn:
            rows = await conn.fetch(sql, tenant_id, *args, size + 1)
        response = pb.ListEventsResponse(events=[convert.event_from_row(row) for row in rows[:size]])
        if len(rows) > size:
            response.next_page_token = self._tokens.encode(tenant_id, query, {"before": rows[size - 1]["sequence"]})
        return response

    async def VerifyChain(self, request: pb.VerifyChainRequest, ctx: Ctx) -> pb.VerifyChainResponse:
        tenant_id = target_tenant(request.tenant_id)
        if tenant_id == context.current_tenant():
            check = await self._verify(tenant_id)
        else:
            await self._require_known(tenant_id)
            with context.platform_scope(tenant_id, "audit.verify_chain"):
                check = await self._verify(tenant_id)
        return pb.VerifyChainResponse(
            valid=check.valid, events_checked=check.checked, first_invalid_sequence=check.first_invalid
        )

    async def _verify(self, tenant_id: str) -> ChainCheck:
        check = ChainCheck()
        async with self._db.transaction(readonly=True) as conn:
            # A cursor reads the chain from one snapshot, a batch at a time, so a long
            # chain is never held in memory and concurrent appends or purges cannot tear it.
            cursor = await conn.cursor(queries.CHAIN, tenant_id)
            while rows := await cursor.fetch(VERIFY_BATCH):
                batch = [convert.chained_from_row(row) for row in rows]
                # Hashing a batch takes milliseconds of CPU: off the event loop, so other calls go on.
                if not await asyncio.to_thread(check.feed, batch):
                    break
        return check

    async def _require_known(self, tenant_id: str) -> None:
        try:
            info = await self._tenants.get(tenant_id)
        except ServiceError:
            raise
        except Exception:
            raise unavailable(
                "the tenant registry cannot be reached to look this tenant up; retry shortly",
                ErrorReason.TENANT_DIRECTORY_UNAVAILABLE,
            ) from None
        if info is None:
            raise not_found(ErrorReason.TENANT_NOT_FOUND, tenant_id)


async def _append(conn: asyncpg.Connection[Any], tenant_id: str, events: list[convert.NewEvent]) -> int:
    """Append ``events`` to ``tenant_id``'s chain (bound to ``conn``); returns how many were new."""
    await conn.execute(queries.LOCK_CHAIN, tenant_id)
    # Read after the lock: every earlier writer of this chain has committed by now.
    known = {
        str(row["event_id"])
        for row in await conn.fetch(queries.KNOWN_EVENT_IDS, tenant_id, [e.event_id for e in events])
    }
    head = await conn.fetchrow(queries.CHAIN_HEAD, tenant_id)
    sequence, prev_hash = (head["sequence"], head["hash"]) if head else (0, "")
    chained: list[ChainedEvent] = []
    details: list[str] = []
    for event in events:
        if event.event_id in known:
            continue  # already in the log (a retried delivery), or twice in this batch: the first counts
        known.add(event.event_id)
        sequence += 1
        link = event.chained(sequence, prev_hash)
        prev_hash = link.hash
        chained.append(link)
        details.append(event.details_json)
    if not chained:
        return 0
    columns = [
        [e.sequence for e in chained],
        [e.event_id for e in chained],
        [e.user_id for e in chained],
        [e.action for e in chained],
        [e.resource for e in chained],
        details,
        [e.ip_address for e in chained],
        [e.request_id for e in chained],
        [e.outcome for e in chained],
        [e.create_time for e in chained],
        [e.prev_hash for e in chained],
        [e.hash for e in chained],
    ]
    await conn.execute(queries.INSERT_EVENTS, tenant_id, *columns)
    return len(chained)
