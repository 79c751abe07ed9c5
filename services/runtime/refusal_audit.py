"""Refused attempts worth auditing (cross-tenant ones), written once per window with a count.

Every cross-tenant attempt is audited, but no caller may write without bound into anyone's
log. Attempts are tallied in memory by caller's tenant, caller, target and method, and each
tally is written once per window (``AUDIT_REFUSAL_WINDOW_SECONDS``, 60 s by default) as one
event: the first attempt's event (its time, request id and address) with ``count``,
``last_time`` and ``window_seconds`` added to its details.

It goes to the target's log when the target is a tenant of the platform, and otherwise to
the caller's own: never a chain for a tenant that does not exist. Tallies are written when
the window closes, as soon as too many are open, and at shutdown; one that cannot be
written is kept for the next window, so nothing is lost while the process lives (a killed
process loses at most its open window). An upsert of one event per attempt series is not
possible: the log is append-only and hash-chained, so an event is never rewritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

from towerco.audit.v1 import audit_log_service_pb2 as audit_pb

from .audit import Auditor
from .tenants import TenantDirectory

log = logging.getLogger("towerco.audit")

#: caller's tenant, caller, target tenant, method
Key = tuple[str, str, str, str]


@dataclass
class _Tally:
    first: audit_pb.AuditEvent
    last_time: datetime
    count: int = 1


class RefusalAudit:
    """Tallies refused attempts and writes each series once per window."""

    def __init__(
        self, auditor: Auditor, tenants: TenantDirectory, window_seconds: float = 60.0, max_open: int = 10_000
    ) -> None:
        self._auditor = auditor
        self._tenants = tenants
        self._window = window_seconds
        self._max_open = max_open
        self._open: dict[Key, _Tally] = {}
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Outcomes, counted where they happen: "attempts" noted, "events" written, "write_failures".
        self.counts: Counter[str] = Counter()

    def note(self, message: audit_pb.AuditEvent) -> None:
        """One refused attempt, described by its audit event (``details`` name the caller's tenant and method)."""
        self.counts["attempts"] += 1
        key = _key(message)
        tally = self._open.get(key)
        if tally is not None:
            tally.count += 1
            tally.last_time = datetime.now(UTC)
            return
        self._open[key] = _Tally(message, message.create_time.ToDatetime(tzinfo=UTC))
        if len(self._open) >= self._max_open:
            self._full.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="refusal-audit")

    async def close(self) -> None:
        """Stop the timer and write every open tally (at shutdown, before the pool closes)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), self._window)
            self._full.clear()
            await self.flush()

    async def flush(self) -> None:
        """Write every open tally as one event; keep those that cannot be written for the next time."""
        tallies, self._open = self._open, {}
        for key, tally in tallies.items():
            try:
                await self._auditor.record_alone(await self._event(tally))
                self.counts["events"] += 1
            except Exception:
                self.counts["write_failures"] += 1
                log.exception("could not record %d refused attempts (%s); kept for the next window", tally.count, key)
                self._keep(key, tally)

    def _keep(self, key: Key, tally: _Tally) -> None:
        later = self._open.get(key)
        if later is not None:
            tally.count += later.count
            tally.last_time = later.last_time
        self._open[key] = tally

    async def _event(self, tally: _Tally) -> audit_pb.AuditEvent:
        event = audit_pb.AuditEvent()
        event.CopyFrom(tally.first)
        event.details.update(
            {
                "count": tally.count,
                "last_time": tally.last_time.isoformat(),
                "window_seconds": self._window,
            }
        )
        caller_tenant = _key(tally.first)[0]
        if not await self._known(event.tenant_id) and caller_tenant:
            event.tenant_id = caller_tenant
        return event

    async def _known(self, tenant_id: str) -> bool:
        """Whether ``tenant_id`` is a tenant of the platform (in doubt: no, so no chain is made for it)."""
        try:
            return await self._tenants.get(tenant_id) is not None
        except Exception:
            return False


def _key(message: audit_pb.AuditEvent) -> Key:
    details = message.details
    caller_tenant = details["caller_tenant"] if "caller_tenant" in details else ""
    method = details["method"] if "method" in details else ""
    return (str(caller_tenant), message.user_id, message.tenant_id, str(method))
