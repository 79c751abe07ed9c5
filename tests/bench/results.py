"""The bench's figures: each printed as it is measured, next to its floor and target, and kept for the JSON.

A figure with a target is judged PASS or MISS; a MISS is reported, never raised: ``make bench``
says what it measured and does not fail the build on a shared machine's bad minute.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Target:
    """What a figure must be: ``value / floor <= limit`` (``ratio``), ``value - floor <= limit``
    (``above``), ``value <= limit`` (``at_most``) or ``value / floor >= limit`` (``ratio_at_least``)."""

    kind: str
    limit: float

    def met(self, value: float, floor: float | None) -> bool:
        if self.kind == "at_most":
            return value <= self.limit
        assert floor is not None and floor > 0, f"a {self.kind} target needs a floor"
        if self.kind == "ratio":
            return value / floor <= self.limit
        if self.kind == "ratio_at_least":
            return value / floor >= self.limit
        if self.kind == "above":
            return value - floor <= self.limit
        raise ValueError(f"unknown target kind {self.kind!r}")

    def text(self, unit: str) -> str:
        return {
            "ratio": f"<= {self.limit:g}x floor",
            "ratio_at_least": f">= {self.limit:g}x floor",
            "above": f"<= floor + {self.limit:g} {unit}",
            "at_most": f"<= {self.limit:g} {unit}",
        }[self.kind]


def ratio_at_most(limit: float) -> Target:
    return Target("ratio", limit)


def ratio_at_least(limit: float) -> Target:
    return Target("ratio_at_least", limit)


def above_floor_at_most(limit: float) -> Target:
    return Target("above", limit)


def at_most(limit: float) -> Target:
    return Target("at_most", limit)


@dataclass(frozen=True)
class Figure:
    """One measured number, and what it is judged against (the JSON row)."""

    name: str
    value: float
    unit: str
    #: The same quantity for the floor, measured in the same run (same unit), if any.
    floor: float | None = None
    floor_name: str = ""
    target: Target | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.value / self.floor if self.floor else None

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        return "PASS" if self.target.met(self.value, self.floor) else "MISS"

    def line(self) -> str:
        text = f"{self.name:<52} {_number(self.value):>9} {self.unit:<8}"
        if self.floor is not None:
            text += f" floor {_number(self.floor):>8} ({self.floor_name})"
            if self.ratio is not None:
                text += f" x{self.ratio:.2f}"
        if self.target is not None:
            text += f"  target {self.target.text(self.unit)}  {self.verdict}"
        if self.note:
            text += f"  [{self.note}]"
        return text

    def row(self) -> dict[str, object]:
        row = asdict(self)
        row["target"] = self.target.text(self.unit) if self.target else None
        row["ratio"] = None if self.ratio is None else round(self.ratio, 4)
        row["verdict"] = self.verdict or None
        return row


def _number(value: float) -> str:
    if value == 0 or abs(value) >= 100 or value == math.floor(value):
        return f"{value:.0f}"
    return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"


class Results:
    """The run's figures, in the order measured."""

    def __init__(self) -> None:
        self.figures: list[Figure] = []
        self.started = time.time()
        #: The checkout measured: its HEAD as the run starts.
        self.commit = _commit()

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        print(figure.line(), flush=True)
        return figure

    def section(self, title: str) -> None:
        print(f"\n== {title}", flush=True)

    def summary(self) -> str:
        judged = [f for f in self.figures if f.target is not None]
        lines = [f.line() for f in judged]
        missed = sum(f.verdict == "MISS" for f in judged)
        lines.append(f"{len(judged) - missed} of {len(judged)} targets met")
        return "\n".join(lines)

    def write(self, path: Path, mode: str, failed: list[str] | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "seconds": round(time.time() - self.started, 1),
            "mode": mode,
            "failed_sections": failed or [],
            "commit": self.commit,
            "machine": {"cpus": os.cpu_count() or 0, "python": platform.python_version()},
            "figures": [f.row() for f in self.figures],
        }
        path.write_text(json.dumps(document, indent=2) + "\n")


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def markdown(document: dict[str, Any], judged_only: bool = False) -> str:
    """A written run (``bench-results.json``) as the README's table: each figure beside its floor and
    target; ``judged_only``: only the figures with a target."""
    lines = [
        "| measurement | figure | floor (same run) | ratio | target | |",
        "|---|---|---|---|---|---|",
    ]
    for row in document["figures"]:
        if judged_only and row["target"] is None:
            continue
        floor = f"{_number(row['floor'])} {row['unit']} ({row['floor_name']})" if row["floor"] is not None else ""
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else ""
        note = f" ({row['note']})" if row["note"] else ""
        figure = f"{_number(row['value'])} {row['unit']}{note}"
        lines.append(
            f"| {row['name']} | {figure} | {floor} | {ratio} | {row['target'] or ''} | {row['verdict'] or ''} |"
        )
    return "\n".join(lines)


def compare(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Two written runs side by side: each figure of either, its value in each and after / before."""
    old = {row["name"]: row for row in before["figures"]}
    new = {row["name"]: row for row in after["figures"]}
    lines = [f"{'figure':<60} {before.get('commit', ''):>10} {after.get('commit', ''):>10}  after/before"]
    for name in [*old, *(n for n in new if n not in old)]:
        a, b = old.get(name), new.get(name)
        unit = (a or b or {}).get("unit", "")
        change = f"x{b['value'] / a['value']:.2f}" if a and b and a["value"] else ""
        first = _number(a["value"]) if a else "-"
        second = _number(b["value"]) if b else "-"
        lines.append(f"{name:<60} {first:>10} {second:>10}  {change:<7} {unit}")
    return "\n".join(lines)
