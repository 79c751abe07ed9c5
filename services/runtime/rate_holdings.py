"""What one process may decide about a tenant's rate without asking Redis.

Two kinds of holding per tenant and rate class, both in this process's memory only:

- a *box*: Redis refused a call and said when the next one can be admitted; until then
  every call of that tenant and class is refused here, with the wait that remains. The
  box starts from the moment the question was sent, which is no later than the moment
  Redis read its clock, so it never outlasts Redis's own answer: GCRA's wait is exact,
  and nothing the box refuses would Redis have admitted.
- a *lease*: Redis admitted a small batch of calls at once (GCRA advanced by all of them
  in the same script), and this process spends them one by one. A lease expires unspent
  after ``ttl_seconds``.

Both are tied to the rate they were decided at: when a tenant's ``per_minute`` changes
(a plan change or an override, seen here through the entitlements every call reads) the
holding no longer applies and the next call asks Redis.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The most calls one lease may hold, whatever the tenant's rate.
LEASE_MOST = 100
#: Holdings kept before the stale ones are swept out.
_SWEEP_AT = 100_000


def lease_size(per_minute: int, lease_seconds: float) -> int:
    """How many calls one Redis decision takes: ``lease_seconds`` of the rate, 1 for small rates."""
    return max(1, min(LEASE_MOST, int(per_minute * lease_seconds / 60)))


@dataclass
class _Holding:
    per_minute: int
    #: Boxed: refused until then. Leased: the lease lapses then.
    until: float
    #: Calls leased and not spent yet.
    left: int = 0
    refused: bool = False


class Holdings:
    """Boxes and leases by rate key; one event loop, no await inside, so no lock."""

    def __init__(self, ttl_seconds: float) -> None:
        self._ttl = ttl_seconds
        self._held: dict[str, _Holding] = {}

    def boxed(self, key: str, per_minute: int, now: float) -> float | None:
        """The seconds left before ``key`` may be admitted, or None when it is not boxed."""
        held = self._held.get(key)
        if held is None or not held.refused or held.per_minute != per_minute or now >= held.until:
            return None
        return held.until - now

    def standing(self, key: str, now: float) -> tuple[float, int] | None:
        """The seconds left in ``key``'s box and the rate it was boxed at; None when not boxed.

        Unlike :meth:`boxed`, whatever the tenant's rate is now: for a refusal answered
        before the call's entitlements are read (``interceptors/standing_refusal.py``)."""
        held = self._held.get(key)
        if held is None or not held.refused or now >= held.until:
            return None
        return held.until - now, held.per_minute

    def take(self, key: str, per_minute: int, now: float) -> bool:
        """Spend one leased call of ``key``; False when there is none to spend."""
        held = self._held.get(key)
        if held is None or held.left <= 0 or held.per_minute != per_minute or now >= held.until:
            return False
        held.left -= 1
        return True

    def box(self, key: str, per_minute: int, sent_at: float, wait_seconds: float) -> None:
        """Redis refused ``key`` when asked at ``sent_at`` and said to wait ``wait_seconds``."""
        self._put(key, _Holding(per_minute, sent_at + wait_seconds, refused=True), sent_at)

    def lease(self, key: str, per_minute: int, now: float, calls: int) -> None:
        """Redis granted ``calls`` more calls of ``key`` than the one being admitted."""
        self._put(key, _Holding(per_minute, now + self._ttl, calls), now)

    def _put(self, key: str, held: _Holding, now: float) -> None:
        self._held[key] = held
        if len(self._held) > _SWEEP_AT:
            self._held = {k: h for k, h in self._held.items() if h.until > now}
