"""Each tenant's hash chain: the canonical encoding of an event, its hash, and the check.

**Canonical encoding (version 1).** An event is encoded as one JSON object holding
exactly these members, serialized by the JSON Canonicalization Scheme (RFC 8785, "JCS"):
members sorted by key, no whitespace, strings in UTF-8 with only ``"``, ``\\`` and control
characters escaped, numbers as ECMAScript prints a double (``1``, ``0.5``, ``1e+21``,
``1e-7``), so that any JCS library in any language reproduces the bytes. The encoding is
the ``rfc8785`` package's; like RFC 8785 it refuses what JSON cannot carry exactly (an
integer beyond ±(2^53 - 1), a lone surrogate, NaN, an infinity), and such an event is
refused at write time instead of being hashed as something else:

=============== =========================================================================
``action``      as stored
``create_time`` RFC 3339 in UTC with exactly six fractional digits, e.g.
                ``2025-01-31T09:15:00.250000Z`` (the database keeps microseconds; a
                caller's nanoseconds are truncated before the event is hashed)
``details``     the ``details`` Struct as a JSON object (``{}`` when unset); its numbers
                are doubles, as protobuf defines them (an integral one read back from
                the database is hashed as the double it was written as)
``event_id``    lower-case hyphenated UUID
``ip_address``  as stored (the normalized text form of the address, or ``""``)
``outcome``     as stored
``prev_hash``   the ``hash`` of the tenant's previous event; ``""`` for sequence 1
``request_id``  as stored
``resource``    as stored
``sequence``    the integer
``tenant_id``   as stored
``user_id``     as stored
=============== =========================================================================

``hash`` = lower-case hex SHA-256 of those UTF-8 bytes; it covers every field of the event
but itself. Each event's ``prev_hash`` is its predecessor's ``hash``, so editing, removing
or reordering a stored event breaks the chain at that point.

**Verification** walks a tenant's events in ``sequence`` order and stops at the first that
fails: a sequence that does not follow its predecessor's (a gap, or a first event after
retention that is not where the chain starts), a ``prev_hash`` that is not its
predecessor's ``hash`` (or is not empty on sequence 1), or a stored ``hash`` that is not
the hash of the event. After a retention purge (see ``services/audit/retention.py``) the
first remaining event's ``prev_hash`` is trusted as the chain's start: the chain proves
that nothing after it was changed, not what was purged before it.

(The audit schema's first migration still calls this module ``chain.py``: applied
migrations are checksummed, so their text stays as it was applied.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import rfc8785

#: The event's members in the canonical encoding (everything but ``hash``).
HASHED_FIELDS = (
    "action",
    "create_time",
    "details",
    "event_id",
    "ip_address",
    "outcome",
    "prev_hash",
    "request_id",
    "resource",
    "sequence",
    "tenant_id",
    "user_id",
)


class CanonicalEncodingError(ValueError):
    """A value JSON cannot carry exactly (NaN, an infinity, an integer beyond 2^53, a lone surrogate)."""


def rfc3339(moment: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ`` in UTC (formatted by hand: strftime pads years unreliably)."""
    t = moment.astimezone(UTC)
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}.{t.microsecond:06d}Z"


def canonical_json(value: Any) -> str:
    """``value`` serialized by RFC 8785 (JCS); CanonicalEncodingError for what JCS refuses."""
    try:
        return rfc8785.dumps(value).decode("utf-8")
    except rfc8785.CanonicalizationError as exc:
        raise CanonicalEncodingError(str(exc)) from None
    except UnicodeEncodeError:  # rfc8785 sorts keys by UTF-16 before it checks them
        raise CanonicalEncodingError("input contains non-UTF-8 codepoints (a lone surrogate)") from None


def as_doubles(value: Any) -> Any:
    """``value`` with every integer made the double it stands for (a Struct's numbers are doubles).

    The database keeps a double's JSON text as a decimal and gives an integral one back as
    an integer (``1e+21`` as ``1000000000000000000000``, ``2^60`` as ``1152921504606847000``),
    which JCS refuses beyond 2^53; as the double it denotes it encodes exactly as it did
    when the event was hashed. An integer that is neither a double's exact value nor how
    one prints (2^53 + 1) was never one, and is refused rather than rounded to a neighbour.
    """
    if isinstance(value, bool) or value is None or isinstance(value, float | str):
        return value
    if isinstance(value, int):
        try:
            double = float(value)
        except OverflowError:
            raise CanonicalEncodingError(f"{value} is beyond the range of a JSON number (a double)") from None
        if double != value and Decimal(canonical_json(double)) != value:
            raise CanonicalEncodingError(f"{value} is not exactly a JSON number (a double); it would be rounded")
        return double
    if isinstance(value, Mapping):
        return {key: as_doubles(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [as_doubles(item) for item in value]
    raise CanonicalEncodingError(f"not a JSON value: {type(value).__name__}")


@dataclass(frozen=True)
class ChainedEvent:
    """An event as the chain sees it: every hashed field, plus its stored hash."""

    tenant_id: str
    sequence: int
    event_id: str
    user_id: str
    action: str
    resource: str
    details: Mapping[str, Any]
    ip_address: str
    request_id: str
    outcome: str
    create_time: datetime
    prev_hash: str
    hash: str = ""

    def canonical(self) -> str:
        members = {name: getattr(self, name) for name in HASHED_FIELDS}
        members["create_time"] = rfc3339(self.create_time)
        members["details"] = as_doubles(self.details)
        return canonical_json(members)

    def compute_hash(self) -> str:
        return hashlib.sha256(self.canonical().encode("utf-8")).hexdigest()


@dataclass
class ChainCheck:
    """Verifies one tenant's events fed in ascending ``sequence`` order, batch by batch."""

    checked: int = 0
    first_invalid: int = 0
    _next_sequence: int | None = None
    _prev_hash: str = ""

    @property
    def valid(self) -> bool:
        return self.first_invalid == 0

    def feed(self, events: Sequence[ChainedEvent]) -> bool:
        """Check the next events; False once an invalid one is found (feed no more)."""
        for event in events:
            self.checked += 1
            if not self._links(event) or event.compute_hash() != event.hash:
                self.first_invalid = event.sequence
                return False
            self._next_sequence = event.sequence + 1
            self._prev_hash = event.hash
        return True

    def _links(self, event: ChainedEvent) -> bool:
        if self._next_sequence is None:
            # The chain's start: sequence 1 with no predecessor, or the first event left
            # by a retention purge, whose prev_hash is trusted.
            return event.prev_hash == "" if event.sequence == 1 else event.sequence > 1 and event.prev_hash != ""
        return event.sequence == self._next_sequence and event.prev_hash == self._prev_hash
