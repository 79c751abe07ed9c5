"""Environment variables declared once: name, type, default, meaning.

Each process kind (the services, the gateway, the dev stack) lists the variables it reads
in one table of :class:`Setting` declarations, as envoyproxy/ratelimit's settings struct
does: one line per variable. Its ``load`` reads them through a mapping it is handed (the
process environment at start-up, a plain dict in tests), and the README's configuration
table is generated from the tables (``python -m deploy.local.settings_doc``), so a
variable, its default and its documentation cannot drift apart.

This module is the one place that touches ``os.environ``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class SettingsError(ValueError):
    """A setting is missing or malformed; the process refuses to start."""


def process_environment() -> Mapping[str, str]:
    """The environment this process was started with: what entry points hand to ``load``."""
    return os.environ


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One environment variable. Unset or blank means ``default``."""

    name: str
    default: T
    doc: str
    #: Turns the stripped text into a value, or raises SettingsError naming the variable.
    parse: Callable[[str, str], T]
    #: The type as the README shows it, e.g. ``int >= 1``.
    kind: str
    #: The default as the README shows it when it is computed (e.g. under ``DATA_DIR``).
    shown: str | None = None
    #: A value outside the range: the message the process refuses to start with, else None.
    check: Callable[[T], bool] | None = None
    refusal: str = ""

    def read(self, environ: Mapping[str, str]) -> T:
        raw = environ.get(self.name, "").strip()
        value = self.parse(self.name, raw) if raw else self.default
        if self.check is not None and not self.check(value):
            raise SettingsError(self.refusal)
        return value

    def is_set(self, environ: Mapping[str, str]) -> bool:
        return bool(environ.get(self.name, "").strip())

    @property
    def default_text(self) -> str:
        if self.shown is not None:
            return self.shown
        if isinstance(self.default, bool):
            return f"`{str(self.default).lower()}`"
        return f"`{self.default}`" if self.default != "" else "empty"


def _text(name: str, raw: str) -> str:
    return raw


def _int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from exc


def _float(name: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from exc


def _bool(name: str, raw: str) -> bool:
    value = raw.lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name} must be true or false, got {value!r}")


def text(name: str, default: str, doc: str, *, shown: str | None = None) -> Setting[str]:
    return Setting(name, default, doc, _text, "text", shown)


def integer(name: str, default: int, doc: str, *, minimum: int | None = None, shown: str | None = None) -> Setting[int]:
    if minimum is None:
        return Setting(name, default, doc, _int, "int", shown)
    low = minimum
    return Setting(
        name, default, doc, _int, f"int >= {low}", shown, lambda v: v >= low, f"{name} must be at least {low}"
    )


def number(
    name: str,
    default: float,
    doc: str,
    *,
    kind: str = "number",
    check: Callable[[float], bool] | None = None,
    refusal: str = "",
) -> Setting[float]:
    return Setting(name, default, doc, _float, kind, None, check, refusal)


def seconds(name: str, default: float, doc: str) -> Setting[float]:
    """A duration in seconds that must be positive (intervals, windows)."""
    return number(
        name,
        default,
        doc,
        kind="number > 0",
        check=lambda value: value > 0,
        refusal=f"{name} must be a positive number of seconds",
    )


def flag(name: str, default: bool, doc: str) -> Setting[bool]:
    return Setting(name, default, doc, _bool, "bool", None)


@dataclass(frozen=True)
class SettingsTable:
    """The variables one kind of process reads."""

    #: Who reads them, as the README's "read by" column says it.
    reader: str
    settings: tuple[Setting[Any], ...]

    @classmethod
    def of(cls, reader: str, *groups: Iterable[Setting[Any]] | Setting[Any]) -> SettingsTable:
        flat: list[Setting[Any]] = []
        for group in groups:
            flat.extend([group] if isinstance(group, Setting) else group)
        names = [s.name for s in flat]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"{reader}: declared twice: {', '.join(duplicated)}")
        return cls(reader, tuple(flat))

    @property
    def names(self) -> frozenset[str]:
        return frozenset(s.name for s in self.settings)


BEGIN_MARKER = "<!-- settings table: generated by `make settings-doc` from the declarations; do not edit -->"
END_MARKER = "<!-- end of settings table -->"


def markdown_table(tables: Iterable[SettingsTable]) -> str:
    """One row per variable (consecutive ones that share a meaning share a row), with who reads it."""
    order: list[Setting[Any]] = []
    readers: dict[str, list[str]] = {}
    for table in tables:
        for setting in table.settings:
            if setting.name not in readers:
                order.append(setting)
                readers[setting.name] = []
            readers[setting.name].append(table.reader)
    rows: list[tuple[list[Setting[Any]], str]] = []
    for setting in order:
        read_by = ", ".join(readers[setting.name])
        last = rows[-1] if rows else None
        if last is not None and last[0][-1].doc == setting.doc and last[1] == read_by:
            last[0].append(setting)
        else:
            rows.append(([setting], read_by))
    lines = ["| variable | type | default | read by | meaning |", "|---|---|---|---|---|"]
    for group, read_by in rows:
        names = ", ".join(f"`{s.name}`" for s in group)
        kinds = _joined(s.kind for s in group)
        defaults = _joined(s.default_text for s in group)
        lines.append(f"| {names} | {kinds} | {defaults} | {read_by} | {group[0].doc} |")
    return "\n".join(lines) + "\n"


def _joined(values: Iterable[str]) -> str:
    listed = list(values)
    return listed[0] if len(set(listed)) == 1 else ", ".join(listed)


def with_table(readme: str, table: str) -> str:
    """``readme`` with the text between the markers replaced by ``table``."""
    head, begin, rest = readme.partition(BEGIN_MARKER)
    _, end, tail = rest.partition(END_MARKER)
    if not begin or not end:
        raise ValueError(f"README lacks the markers {BEGIN_MARKER!r} ... {END_MARKER!r}")
    return f"{head}{BEGIN_MARKER}\n{table}{END_MARKER}{tail}"
