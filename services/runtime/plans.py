"""Subscription plans, read once at start-up from the reviewed plans file.

``services/features/plans.toml`` (or ``PLANS_FILE``) defines each plan's features and
limits. Every service reads it, so entitlements are evaluated in memory on every call;
a mistake in it stops a process from starting rather than being discovered per request.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

DEFAULT_PLANS_FILE = Path(__file__).resolve().parents[1] / "features" / "plans.toml"

#: Every limit a plan and an entitlement carry; -1 means unlimited.
LIMITS = (
    "max_sites",
    "max_users",
    "rpm_read",
    "rpm_write",
    "db_concurrency",
    "audit_retention_days",
    "call_concurrency",
)
UNLIMITED = -1
FEATURE_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
PLAN_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class PlansError(ValueError):
    """The plans file is missing or breaks a rule; the process must not start."""


@dataclass(frozen=True)
class Plan:
    name: str
    features: frozenset[str]
    limits: Mapping[str, int]
    #: ``dedicated_cell = "may"``: its tenants may be placed in a dedicated database cell; ``"never"`` (default).
    dedicated_cell: bool = False


@dataclass(frozen=True)
class Plans:
    """Every plan, smallest first, and the default limits."""

    ordered: tuple[Plan, ...]
    default_limits: Mapping[str, int]

    def get(self, name: str) -> Plan | None:
        return next((p for p in self.ordered if p.name == name), None)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.ordered)


def load_plans(path: Path | str = DEFAULT_PLANS_FILE) -> Plans:
    try:
        with Path(path).open("rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PlansError(f"plans file {path}: {exc}") from None
    return parse_plans(raw, str(path))


def parse_plans(raw: Mapping[str, Any], source: str = "plans") -> Plans:
    defaults = _limits(raw.get("defaults", {}).get("limits", {}), f"{source}: [defaults.limits]", partial=False)
    declared = raw.get("plans", {})
    order = raw.get("order", [])
    if not isinstance(declared, dict) or not declared:
        raise PlansError(f"{source}: no [plans.<name>] tables")
    if not isinstance(order, list) or sorted(order) != sorted(declared) or len(set(order)) != len(order):
        raise PlansError(f"{source}: `order` must list every plan exactly once (plans: {', '.join(sorted(declared))})")
    plans: list[Plan] = []
    for name in order:
        if not isinstance(name, str) or not PLAN_PATTERN.fullmatch(name):
            raise PlansError(f"{source}: plan name {name!r} must match {PLAN_PATTERN.pattern}")
        body = declared[name]
        where = f"{source}: [plans.{name}]"
        features = body.get("features", [])
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise PlansError(f"{where}: features must be a list of names")
        bad = [f for f in features if not FEATURE_PATTERN.fullmatch(f)]
        if bad or len(set(features)) != len(features):
            raise PlansError(f"{where}: features must be unique names matching {FEATURE_PATTERN.pattern}: {bad}")
        unknown = set(body) - {"features", "limits", "dedicated_cell"}
        if unknown:
            raise PlansError(f"{where}: unknown keys {sorted(unknown)}")
        dedicated = body.get("dedicated_cell", "never")
        if dedicated not in ("may", "never"):
            raise PlansError(f'{where}: dedicated_cell must be "may" or "never", got {dedicated!r}')
        limits = {**defaults, **_limits(body.get("limits", {}), where, partial=True)}
        plans.append(Plan(name, frozenset(features), MappingProxyType(limits), dedicated == "may"))
    return Plans(tuple(plans), MappingProxyType(defaults))


def _limits(raw: Any, where: str, *, partial: bool) -> dict[str, int]:
    if not isinstance(raw, dict):
        raise PlansError(f"{where}: limits must be a table")
    unknown = set(raw) - set(LIMITS)
    if unknown:
        raise PlansError(f"{where}: unknown limits {sorted(unknown)}; known: {', '.join(LIMITS)}")
    if not partial and set(raw) != set(LIMITS):
        raise PlansError(f"{where}: must set every limit: {', '.join(LIMITS)}")
    out: dict[str, int] = {}
    for name, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < UNLIMITED:
            raise PlansError(f"{where}: {name} must be an integer, 0 or more, or -1 for unlimited")
        out[name] = value
    return out
