"""The plans file's rules, and how entitlements are evaluated from a record (no servers needed)."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from services.runtime.entitlements import FeatureOverride, Record, evaluate
from services.runtime.plans import DEFAULT_PLANS_FILE, LIMITS, PlansError, load_plans, parse_plans

GOOD: dict[str, Any] = {
    "order": ["small", "large"],
    "defaults": {"limits": dict.fromkeys(LIMITS, 1)},
    "plans": {
        "small": {"features": ["a"], "limits": {"max_sites": 10}},
        "large": {"features": ["a", "b"], "limits": {"max_sites": -1, "rpm_read": 100}},
    },
}


def test_the_repository_plans_file_loads():
    plans = load_plans(DEFAULT_PLANS_FILE)
    assert plans.names == ("basic", "professional", "enterprise")
    for plan in plans.ordered:
        assert set(plan.limits) == set(LIMITS)


def test_a_plan_inherits_default_limits_it_does_not_set():
    plans = parse_plans(GOOD)
    small = plans.get("small")
    assert small is not None
    assert small.limits == {**dict.fromkeys(LIMITS, 1), "max_sites": 10}


def _broken(change: Any) -> dict[str, Any]:
    raw = copy.deepcopy(GOOD)
    change(raw)
    return raw


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["defaults"]["limits"].pop("rpm_write"), "every limit"),
        (lambda r: r["plans"]["small"]["limits"].update(max_towers=1), "unknown limits"),
        (lambda r: r["plans"]["small"]["limits"].update(max_sites=-2), "-1 for unlimited"),
        (lambda r: r["plans"]["small"]["limits"].update(max_sites="10"), "integer"),
        (lambda r: r["plans"]["small"]["limits"].update(max_sites=True), "integer"),
        (lambda r: r["plans"]["small"].update(features=["Bad-Name"]), "features"),
        (lambda r: r["plans"]["small"].update(features=["a", "a"]), "features"),
        (lambda r: r["plans"]["small"].update(extra=1), "unknown keys"),
        (lambda r: r.update(order=["small"]), "order"),
        (lambda r: r.update(order=["small", "large", "large"]), "order"),
        (lambda r: r.update(plans={}), "no [plans"),
    ],
)
def test_a_broken_plans_file_is_refused_with_a_reason(change, message):
    with pytest.raises(PlansError, match=re.escape(message)):
        parse_plans(_broken(change))


def test_an_unreadable_plans_file_is_refused(tmp_path):
    path = tmp_path / "plans.toml"
    path.write_text("order = [")
    with pytest.raises(PlansError, match=r"plans\.toml"):
        load_plans(path)
    with pytest.raises(PlansError, match=r"missing\.toml"):
        load_plans(tmp_path / "missing.toml")


def test_precedence_override_then_plan_then_default():
    plans = parse_plans(GOOD)
    record = Record(
        "small",
        {"b": FeatureOverride(True), "a": FeatureOverride(False)},
        {"rpm_read": 7},
    )
    found = evaluate(plans, "t1", record, now=1000.0)
    assert found.features == frozenset({"b"})
    assert found.feature("a") == (False, "OVERRIDE_WITHHELD")
    assert found.feature("b") == (True, "OVERRIDE_GRANTED")
    assert found.feature("zzz") == (False, "NOT_IN_PLAN")
    assert found.limit("rpm_read") == 7  # override
    assert found.limit("max_sites") == 10  # plan
    assert found.limit("max_users") == 1  # default


def test_an_override_applies_until_its_expiry_only():
    plans = parse_plans(GOOD)
    record = Record("small", {"b": FeatureOverride(True, expires_at=2000.0)})
    assert evaluate(plans, "t1", record, now=1999.9).feature("b") == (True, "OVERRIDE_GRANTED")
    assert evaluate(plans, "t1", record, now=2000.0).feature("b") == (False, "NOT_IN_PLAN")


def test_a_plan_the_file_no_longer_defines_falls_back_to_defaults():
    found = evaluate(parse_plans(GOOD), "t1", Record("retired"), now=0)
    assert found.features == frozenset()
    assert dict(found.limits) == dict.fromkeys(LIMITS, 1)


def test_a_record_survives_its_cache_and_wire_forms():
    record = Record("large", {"b": FeatureOverride(False, 1_800_000_000.5)}, {"max_users": -1})
    assert Record.from_value(record.as_value()) == record
    assert Record.from_proto(record.to_proto("t1", 3)) == record
