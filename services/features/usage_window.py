"""The window a usage read covers: whole UTC hours, start before end, at most 366 days."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from google.protobuf import timestamp_pb2

from services.runtime.validation import Violations

#: A year, leap years included: a calendar year (or any 12 months) always fits.
MAX_WINDOW = timedelta(days=366)
_HOUR_SECONDS = 3600


@dataclass(frozen=True)
class Window:
    """``[start, end)``, both at the start of a UTC hour."""

    start: datetime
    end: datetime

    def query(self) -> dict[str, str]:
        """What a page token is bound to: a token of another window is refused."""
        return {"start": self.start.isoformat(), "end": self.end.isoformat()}


def checked_window(
    v: Violations, start: timestamp_pb2.Timestamp, end: timestamp_pb2.Timestamp, *, present: tuple[bool, bool]
) -> Window | None:
    """The window the request names, or None with each bad field added to ``v``."""
    start_ok = _whole_hour(v, "start_time", start, present[0])
    end_ok = _whole_hour(v, "end_time", end, present[1])
    if not (start_ok and end_ok):
        return None
    window = Window(start.ToDatetime(UTC), end.ToDatetime(UTC))
    if window.end <= window.start:
        v.add("end_time", "must be after start_time")
        return None
    if window.end - window.start > MAX_WINDOW:
        v.add("end_time", f"must be at most {MAX_WINDOW.days} days after start_time")
        return None
    return window


def _whole_hour(v: Violations, field: str, stamp: timestamp_pb2.Timestamp, present: bool) -> bool:
    if not present:
        v.add(field, "is required: a whole UTC hour, e.g. 2026-11-01T00:00:00Z")
        return False
    if stamp.seconds % _HOUR_SECONDS or stamp.nanos:
        v.add(field, "must be a whole UTC hour (minutes, seconds and nanoseconds 0)")
        return False
    # Timestamp's own range: 0001-01-01 to 9999-12-31 (ToDatetime fails beyond it).
    if not -62135596800 <= stamp.seconds <= 253402297199:
        v.add(field, "must be between 0001-01-01 and 9999-12-31")
        return False
    return True
