"""``usage.threshold_reached``: a tenant's use of a held resource crossing 80% or 100% of its limit.

Checked where the use grows, in the transaction that grows it, so the event commits with
the change or not at all. A *crossing* is a change that takes the count from below a
threshold to at or above it: one event per threshold per crossing. A tenant that stays
above it gets no more; one that drops below (it deletes sites) and climbs back gets a new
event, since it is again about to run out. That is the period for a held resource such as
``max_sites``: from one crossing until the count drops below the threshold again.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from .audit import Auditor

ACTION = "usage.threshold_reached"
#: Percentages of a limit that are worth telling the tenant about, in rising order.
THRESHOLDS = (80, 100)


def crossed(before: int, after: int, limit: int) -> tuple[int, ...]:
    """The thresholds a change from ``before`` to ``after`` units crosses upwards; none when unlimited (-1)."""
    if limit <= 0:
        return ()
    return tuple(p for p in THRESHOLDS if before * 100 < p * limit <= after * 100)


async def record_crossings(
    audit: Auditor, conn: asyncpg.Connection[Any], resource: str, before: int, after: int, limit: int
) -> None:
    """One audit event per threshold crossed, in ``conn``'s transaction."""
    for percent in crossed(before, after, limit):
        details = {"resource": resource, "threshold_percent": percent, "limit": limit, "usage": after}
        await audit.record(conn, ACTION, f"limits/{resource}", details)
