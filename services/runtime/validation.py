"""Collect every bad field of a request, then fail once with all of them; the text rules.

The character rules every request's strings obey (no U+0000 anywhere; display names
clean for people to read) are written here once. The request text link applies them to
every field, from the descriptors and their ``(towerco.api.v1.text)`` options.
"""

from __future__ import annotations

import math
import re
import unicodedata

import asyncpg

from .errors import FieldViolation, ServiceError, invalid_argument
from .ids import IdRule

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

    def identifier(self, field: str, value: str, rule: IdRule, *, required: bool = True) -> None:
        if value and rule.regex.fullmatch(value):
            return  # valid: the rule's text (a property, made anew) is not needed
        self.pattern(field, value, rule.regex, rule.pattern, required=required)

    def number(self, field: str, value: float, low: float, high: float) -> None:
        if not math.isfinite(value) or not low <= value <= high:
            self.add(field, f"must be a number from {low:g} to {high:g}")

    def raise_if_any(self) -> None:
        if self.items:
            raise invalid_argument(self.items)


NUL = "\x00"
NUL_PROBLEM = "must not contain the NUL character (U+0000)"

#: Categories a display text refuses, and what to call them in an error. Unassigned code
#: points (Cn) are accepted, so that a server with an older Unicode database does not
#: refuse newer scripts and emoji; non-characters (also Cn) are refused by number.
_NOT_DISPLAYABLE = {
    "Cc": "control character",
    "Cf": "invisible format character (bidi control, zero-width character or byte order mark)",
    "Zl": "line separator",
    "Zp": "paragraph separator",
    "Cs": "surrogate",
    "Co": "private-use character",
}


#: What PostgreSQL raises for text it cannot store: U+0000 in text (22021) or jsonb (22P05).
UNSTORABLE_TEXT: tuple[type[Exception], ...] = (
    asyncpg.CharacterNotInRepertoireError,
    asyncpg.UntranslatableCharacterError,
)


def unstorable_text() -> ServiceError:
    """The answer when such text reached the database after all (not through a request field)."""
    return invalid_argument(
        [FieldViolation("request", "holds text the database cannot store (the NUL character, U+0000)")]
    )


def is_noncharacter(code_point: int) -> bool:
    """U+FDD0..U+FDEF and the last two code points of every plane (U+xFFFE, U+xFFFF)."""
    return 0xFDD0 <= code_point <= 0xFDEF or code_point & 0xFFFE == 0xFFFE


def display_text_problem(value: str) -> str | None:
    """Why ``value`` cannot be a name people read on one line, or None when it can.

    Refused: controls, invisible format characters (bidi overrides and isolates,
    zero-width spaces and joiners, U+FEFF...), line and paragraph separators,
    surrogates, private-use characters and non-characters: they make a name read
    differently from what it is (U+202E turns text around) or look like another one.
    """
    if value.isprintable():  # the common case, at C speed: none of those, nor any Cn
        return None
    for position, char in enumerate(value):
        if char.isprintable():
            continue
        category = unicodedata.category(char)
        what = _NOT_DISPLAYABLE.get(category)
        if what is None and is_noncharacter(ord(char)):
            what = "non-character"
        if what is not None:
            return f"must not contain the {what} U+{ord(char):04X} (at position {position})"
    return None  # only spaces other than U+0020 (Zs) or unassigned code points


def text_problem(value: str, *, display: bool = False) -> str | None:
    """Why ``value`` breaks the text rules of its field (any text; a display text), or None."""
    if NUL in value:
        return NUL_PROBLEM
    return display_text_problem(value) if display else None


def path_key(key: object) -> str:
    """A map key fit for a field path or a message: printable ASCII, at most 64 characters."""
    text = str(key)
    shown = "".join(ch if " " <= ch <= "~" and ch not in "[]" else "?" for ch in text[:64])
    return shown + ("..." if len(text) > 64 else "")
