"""Collect every bad field of a request, then fail once with all of them."""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import FieldViolation, invalid_argument

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_CONTROL_SINGLE_LINE = re.compile(r"[\x00-\x1f\x7f]")


class Violations:
    """A request's field violations; :meth:`raise_if_any` sends them as one BadRequest."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def text(
        self, field: str, value: str, *, max_len: int, required: bool = False, min_len: int = 1, multiline: bool = False
    ) -> None:
        if not value:
            if required:
                self.add(field, "is required")
            return
        if required and len(value.strip()) < min_len:
            self.add(field, "must not be blank")
        elif len(value) > max_len:
            self.add(field, f"must be at most {max_len} characters (got {len(value)})")
        elif (_CONTROL if multiline else _CONTROL_SINGLE_LINE).search(value):
            self.add(field, "must not contain control characters" + ("" if multiline else " (one line only)"))

    def pattern(self, field: str, value: str, pattern: re.Pattern[str], hint: str, *, required: bool = True) -> None:
        if not value:
            if required:
                self.add(field, "is required")
            return
        if not pattern.fullmatch(value):
            self.add(field, f"must match {hint}")

    def number(self, field: str, value: float, low: float, high: float) -> None:
        if not math.isfinite(value) or not low <= value <= high:
            self.add(field, f"must be a number from {low:g} to {high:g}")

    def raise_if_any(self) -> None:
        if self.items:
            raise invalid_argument(self.items)


def has_nul(value: Any) -> bool:
    """True if a JSON-like value holds U+0000 in a key or string (PostgreSQL's jsonb cannot store it)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in key or has_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(has_nul(item) for item in value)
    return False
