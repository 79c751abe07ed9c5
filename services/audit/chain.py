"""Each tenant's hash chain: the canonical encoding of an event, its hash, and the check.

**Canonical encoding (version 1).** An event is encoded as one JSON object holding
exactly these members, serialized by the JSON Canonicalization Scheme (RFC 8785, "JCS"):
members sorted by key, no whitespace, strings in UTF-8 with only ``"``, ``\\`` and control
characters escaped, numbers as ECMAScript prints a double (``1``, ``0.5``, ``1e+21``,
``1e-7``), so that any JCS library in any language reproduces the bytes:

=============== =========================================================================
``action``      as stored
``create_time`` RFC 3339 in UTC with exactly six fractional digits, e.g.
                ``2025-01-31T09:15:00.250000Z`` (the database keeps microseconds; a
                caller's nanoseconds are truncated before the event is hashed)
``details``     the ``details`` Struct as a JSON object (``{}`` when unset); its numbers
                are doubles, as protobuf defines them
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
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

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
    """A value JSON cannot carry exactly (NaN, an infinity, a non-string key)."""


def rfc3339(moment: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ`` in UTC (formatted by hand: strftime pads years unreliably)."""
    t = moment.astimezone(UTC)
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}.{t.microsecond:06d}Z"


def canonical_json(value: Any) -> str:
    """``value`` serialized by RFC 8785 (JCS)."""
    parts: list[str] = []
    _write(value, parts)
    return "".join(parts)


def _write(value: Any, out: list[str]) -> None:
    if value is None or isinstance(value, bool):
        out.append("null" if value is None else "true" if value else "false")
    elif isinstance(value, int | float):
        out.append(_number(float(value)))
    elif isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))  # escapes exactly what JCS escapes
    elif isinstance(value, Mapping):
        if not all(isinstance(key, str) for key in value):
            raise CanonicalEncodingError("object keys must be strings")
        out.append("{")
        # JCS orders members by the UTF-16 code units of their keys.
        for i, key in enumerate(sorted(value, key=lambda k: k.encode("utf-16-be"))):
            if i:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _write(value[key], out)
        out.append("}")
    elif isinstance(value, Sequence):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out)
        out.append("]")
    else:
        raise CanonicalEncodingError(f"not a JSON value: {type(value).__name__}")


def _number(x: float) -> str:
    """A double as ECMAScript's Number.prototype.toString prints it (RFC 8785 section 3.2.2.3)."""
    if not math.isfinite(x):
        raise CanonicalEncodingError("numbers must be finite")
    if x == 0:
        return "0"  # -0 as well
    if x < 0:
        return "-" + _number(-x)
    # repr gives the shortest digits that round-trip, as ECMAScript requires.
    _, digit_tuple, exponent = Decimal(repr(x)).normalize().as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(map(str, digit_tuple))
    k = len(digits)
    n = exponent + k  # the value is 0.<digits> x 10^n
    if k <= n <= 21:
        return digits + "0" * (n - k)
    if 0 < n <= 21:
        return digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return "0." + "0" * -n + digits
    e = n - 1
    sign = "+" if e >= 0 else "-"
    mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
    return f"{mantissa}e{sign}{abs(e)}"


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
