"""Each identifier rule has one definition; every other place that states it is checked here.

The tenant-id and request-id rules live in ``services/runtime/ids.py`` (the site, feature
and plan ids beside their services). What cannot be rendered from them is compared to
them: the SQL CHECKs of migrations already shipped (recorded by checksum, never edited),
the proto comments, the README and the gateway's rendered Lua. No server is needed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.__main__ import deploy_settings, overlay_values
from gateway.config import lua_pattern, origin_matchers, render
from services.runtime.ids import REQUEST_ID, ROLE_ID, TENANT_ID, IdRule
from services.runtime.plans import FEATURE_PATTERN, PLAN_PATTERN
from services.sites.convert import SITE_ID
from services.tenant.tenant_settings_rules import COLOR

REPO = Path(__file__).resolve().parents[1]

#: The rule each identifier column or field obeys, by its name (any ``*tenant_id``: the
#: tenant id rule).
RULE_OF = {
    "tenant_id": TENANT_ID.pattern,
    "site_id": SITE_ID.pattern,
    "feature": FEATURE_PATTERN.pattern,
    "plan": PLAN_PATTERN.pattern,
    "role_id": ROLE_ID.pattern,
}
#: Every pattern the documentation may quote: one of the rules above, or another rule
#: defined in code. A pattern quoted that is none of these is a copy that drifted.
KNOWN_PATTERNS = {*RULE_OF.values(), REQUEST_ID.pattern, COLOR.pattern}

SQL_MATCH = re.compile(r"(\w+)\s*~\s*'([^']*)'")
QUOTED_PATTERN = re.compile(r"`(\^[^`]*\$)`")
PROTO_FIELD = re.compile(r"^\s*(?:repeated\s+|optional\s+)?[\w.]+\s+(\w+)\s*=\s*\d+")
#: Code that may spell out an id rule: its one definition.
DEFINITIONS = {REPO / "services" / "runtime" / "ids.py"}


def _rule_of(name: str) -> str | None:
    return TENANT_ID.pattern if name.endswith("tenant_id") else RULE_OF.get(name)


def _files(*globs: str) -> list[Path]:
    return sorted({path for pattern in globs for path in REPO.glob(pattern)})


def _migrations() -> list[Path]:
    return _files("services/*/migrations/*.sql", "services/runtime/sql/*/*.sql")


def _protos() -> list[Path]:
    return _files("protos/**/*.proto")


def _code() -> list[Path]:
    found = _files("services/**/*.py", "gateway/*.py", "gateway/*.lua", "deploy/**/*.py")
    return [path for path in found if path not in DEFINITIONS]


def test_every_sql_check_of_an_id_column_is_its_python_rule():
    checks = [
        (path, column, regex)
        for path in _migrations()
        for column, regex in SQL_MATCH.findall(path.read_text())
        if _rule_of(column) is not None
    ]
    assert len(checks) >= 11 and {column for _, column, _ in checks} >= {"tenant_id", "site_id", "plan", "feature"}
    drifted = [
        f"{path.relative_to(REPO)}: CHECK ({column} ~ '{regex}') but the rule is {_rule_of(column)}"
        for path, column, regex in checks
        if _rule_of(column) != regex
    ]
    assert drifted == []


def _proto_comments() -> list[tuple[str, str | None, str]]:
    """Each comment of the protos: where it ends, the field it documents (None for a message,
    service or enum value) and its text."""
    found: list[tuple[str, str | None, str]] = []
    for path in _protos():
        comment: list[str] = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip().startswith("//"):
                comment.append(line.strip().lstrip("/ "))
                continue
            if comment:
                field = PROTO_FIELD.match(line)
                found.append(
                    (f"{path.relative_to(REPO)}:{number}", field.group(1) if field else None, " ".join(comment))
                )
            comment = []
    return found


def _lengths(pattern: str) -> tuple[int, int]:
    """The shortest and longest identifier an ``^[first][rest]{m,n}$`` or ``^[all]{m,n}$`` rule allows."""
    shape = re.fullmatch(r"\^\[[^]]*\](\[[^]]*\])?\{(\d+),(\d+)\}\$", pattern)
    assert shape is not None, pattern
    extra = 1 if shape[1] else 0
    return int(shape[2]) + extra, int(shape[3]) + extra


def test_every_pattern_a_proto_comment_quotes_is_the_rule_of_its_field():
    drifted: list[str] = []
    quoted = 0
    for where, field, text in _proto_comments():
        want = _rule_of(field) if field else None
        for pattern in QUOTED_PATTERN.findall(text):
            quoted += 1
            if pattern not in KNOWN_PATTERNS or (want is not None and pattern != want):
                drifted.append(f"{where} ({field}): `{pattern}`")
    assert quoted >= 8  # the tenant, site and feature ids, at least
    assert drifted == []


def test_the_lengths_a_proto_comment_states_are_those_of_its_fields_rule():
    stated = 0
    drifted: list[str] = []
    for where, field, text in _proto_comments():
        rule = _rule_of(field) if field else None
        if field == "request_id" and "idempotency key" in text.lower():
            rule = REQUEST_ID.pattern
            lengths = [(REQUEST_ID.min_length, int(n)) for n in re.findall(r"up to (\d+) characters", text)]
            assert lengths, f"{where}: an idempotency key's comment says how long it may be"
        else:
            lengths = [(int(low), int(high)) for low, high in re.findall(r"(\d+)\.\.(\d+) characters", text)]
        if rule is None:
            continue
        stated += len(lengths)
        drifted += [f"{where} ({field}): {low}..{high}" for low, high in lengths if (low, high) != _lengths(rule)]
    assert stated >= 6  # the tenant's, site's and feature's ids, the three idempotency keys
    assert drifted == []


def test_the_readme_quotes_the_rules():
    text = (REPO / "README.md").read_text()
    quoted = QUOTED_PATTERN.findall(text)
    assert TENANT_ID.pattern in quoted
    assert set(quoted) <= KNOWN_PATTERNS, set(quoted) - KNOWN_PATTERNS
    lengths = f"{REQUEST_ID.min_length} to {REQUEST_ID.max_length} of `{REQUEST_ID.rest}`"
    assert f"follows the services' rule ({lengths}, rendered from `REQUEST_ID`" in " ".join(text.split())


def _copies(rule: IdRule) -> list[str]:
    """How a copy of ``rule`` would be written: its regex, as the old code and Lua had it."""
    body = rule.pattern[1:-1]
    lua_rest = rule.rest[:-1] + "%-" if rule.rest.endswith("-") else rule.rest  # a literal "-", escaped
    start = f"^[{rule.first}]" if rule.first == rule.rest else f"[{rule.first}][{rule.rest}]"
    return [body, start, f"[{rule.first}][{lua_rest}]", lua_pattern(rule)]


@pytest.mark.parametrize("rule", [TENANT_ID, REQUEST_ID], ids=["tenant_id", "request_id"])
def test_no_code_spells_out_an_id_rule_but_its_definition(rule):
    copies = [
        f"{path.relative_to(REPO)}: {copy}"
        for path in _code()
        for copy in set(_copies(rule))
        if copy in path.read_text()
    ]
    assert copies == []


def test_no_code_writes_a_tenant_id_problem_by_hand():
    written = [str(path.relative_to(REPO)) for path in _code() if '"must match ^' in path.read_text()]
    assert written == []


def _lua_set(text: str) -> set[str]:
    """The characters of a Lua set written as :func:`gateway.config.lua_pattern` does."""
    return set(re.sub(r"%(.)", r"\1", text))


def _lua_keeps(lua: dict[str, object], value: str) -> bool:
    pattern = str(lua["pattern"])
    first, rest = re.fullmatch(r"\^\[(.*?)\](?:\[(.*)\]\*)?\+?\$", pattern).groups()  # type: ignore[union-attr]
    in_length = int(str(lua["min_length"])) <= len(value) <= int(str(lua["max_length"]))
    if rest is None:
        return in_length and set(value) <= _lua_set(first)
    return in_length and value[:1] in _lua_set(first) and set(value[1:]) <= _lua_set(rest)


def _filter(node: object, name: str) -> dict[str, object] | None:
    if isinstance(node, dict):
        if node.get("name") == name:
            return node
        node = list(node.values())
    if isinstance(node, list):
        for item in node:
            found = _filter(item, name)
            if found is not None:
                return found
    return None


def _edge_tenant_rule() -> dict[str, object]:
    edge = _filter(render(deploy_settings(overlay_values("prod"))), "towerco.edge_identity")
    assert edge is not None
    source = edge["typed_config"]["default_source_code"]["inline_string"]  # type: ignore[index]
    rule = re.search(r'tenant_id = \{pattern = "([^"]*)", min_length = (\d+), max_length = (\d+)\}', source)
    assert rule is not None, "the edge Lua's EDGE.tenant_id is not rendered"
    assert "EDGE.tenant_id" in source
    return {"pattern": rule[1], "min_length": rule[2], "max_length": rule[3]}


SAMPLES = ["abc", "ab", "a" * 50, "a" * 51, "tenant_a", "tenant-b", "1abc", "_abc", "Abc", "abC", "a.bc", "a:b", ""]


def test_the_gateway_takes_a_tenant_from_the_host_by_the_services_rule():
    lua = _edge_tenant_rule()
    for sample in SAMPLES:
        assert _lua_keeps(lua, sample) == TENANT_ID.matches(sample), sample


def test_the_gateway_allows_cors_origins_of_tenant_subdomains_by_the_services_rule():
    (matcher,) = origin_matchers(["https://*.example.test"])
    # The rule's characters without its length bound, which RE2 would expand past its limit.
    label = f"[{TENANT_ID.first}][{TENANT_ID.rest}]+"
    assert matcher["safe_regex"]["regex"] == f"^https://{label}\\.example\\.test$"
    regex = re.compile(matcher["safe_regex"]["regex"])
    for sample in SAMPLES:
        if TENANT_ID.min_length <= len(sample) <= TENANT_ID.max_length:
            assert bool(regex.fullmatch(f"https://{sample}.example.test")) == TENANT_ID.matches(sample), sample
