"""The error catalogue (``ErrorReason``, protos/towerco/api/v1/error_reason.proto) lists
every ErrorInfo reason the platform returns, with its code, metadata keys and RetryInfo.

Three nets catch a reason returned anywhere that the catalogue lacks:

* the code is read here without a server: every reason handed to an error helper, every
  ``ErrorReason.X`` named, every reason the gateway's Lua returns is catalogued, and a
  helper called with a literal reason is the one for its catalogued code and gets its
  catalogued metadata keys;
* at run time the helpers and :class:`ServiceError` refuse an uncatalogued reason, or a
  code, metadata or RetryInfo other than the entry's (these tests);
* every error the other tests receive is checked against the catalogue where they decode
  it (``tests.support.assert_catalogued``).
"""

from __future__ import annotations

import ast
import base64
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from towerco.api.v1 import error_reason_pb2

from gateway.config import GRPC_REPLIES_LUA, GatewaySettings, apis, gateway_reasons, render_json
from services.runtime import error_catalogue
from services.runtime.error_catalogue import CATALOGUE, CatalogueError, ErrorReason
from services.runtime.errors import (
    FieldViolation,
    ServiceError,
    invalid_argument,
    not_found,
    permission_denied,
    resource_exhausted,
    unavailable,
)

from .support import assert_catalogued

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(
    path
    for folder in ("services", "gateway")
    for path in (REPO / folder).rglob("*.py")
    if "node_modules" not in path.parts
)
LUA = sorted((REPO / "gateway").glob("*.lua"))
#: What an ErrorInfo reason looks like: UPPER_SNAKE with at least one underscore.
REASON_LIKE = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+")

#: The error helpers of services/runtime/errors.py and the status code each one sends.
HELPER_CODES = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "already_exists": grpc.StatusCode.ALREADY_EXISTS,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "aborted": grpc.StatusCode.ABORTED,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "internal": grpc.StatusCode.INTERNAL,
}
#: Helpers whose metadata keys are fixed by the helper itself, not passed by the caller.
FIXED_METADATA = {"not_found": {"resource", "name"}, "already_exists": {"resource", "name"}}
#: Keyword arguments of the helpers that are not ErrorInfo metadata.
NOT_METADATA = {"reason", "retry_after_seconds"}
#: What else raises with a reason taken from its arguments.
REASON_TAKERS = {*HELPER_CODES, "ServiceError", "TokenError", "_status_details"}


@dataclass(frozen=True)
class Call:
    """One call of an error helper in the platform's code."""

    where: str
    helper: str
    node: ast.Call


def _calls() -> Iterator[Call]:
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if name in REASON_TAKERS:
                    yield Call(f"{path.relative_to(REPO)}:{node.lineno}", name, node)


def _named_reasons() -> Iterator[tuple[str, str]]:
    """Every ``ErrorReason.X`` the platform's code names, with where (but the module that
    reads the enum's descriptor)."""
    for path in SOURCES:
        if path.name == "error_catalogue.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "ErrorReason"
                and node.attr not in ("Name", "Value")
            ):
                yield f"{path.relative_to(REPO)}:{node.lineno}", node.attr


def _reason_of(call: Call) -> str | None:
    """The ``ErrorReason.X`` a call passes as its reason, when written at the call."""
    args = [*call.node.args, *(k.value for k in call.node.keywords if k.arg == "reason")]
    for arg in args:
        if isinstance(arg, ast.Attribute) and isinstance(arg.value, ast.Name) and arg.value.id == "ErrorReason":
            return arg.attr
    return None


def _lua_code(text: str) -> str:
    """Lua source without its comments (``--`` to the end of the line)."""
    return "\n".join(re.sub(r"--.*$", "", line) for line in text.splitlines())


# ---- the catalogue itself ------------------------------------------------------------


def test_every_reason_is_catalogued_with_a_code_other_than_ok_or_unknown() -> None:
    values = [v for v in ErrorReason.DESCRIPTOR.values if v.number != 0]
    assert {v.name for v in values} == set(CATALOGUE)
    for name, entry in CATALOGUE.items():
        assert entry.code not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN), name


def test_every_reason_is_documented_in_the_proto() -> None:
    text = (REPO / "protos/towerco/api/v1/error_reason.proto").read_text()
    for name in CATALOGUE:
        before = text[: text.index(f"  {name} = ")].rstrip().splitlines()[-1]
        assert before.strip().startswith("//"), f"{name} has no comment saying when it is sent"


def test_reason_names_are_the_wire_strings_clients_compare() -> None:
    assert all(REASON_LIKE.fullmatch(name) or name.isupper() for name in CATALOGUE)
    assert not [name for name in CATALOGUE if name.startswith("ERROR_REASON_")]
    assert error_catalogue.name(ErrorReason.CROSS_TENANT_DENIED) == "CROSS_TENANT_DENIED"


def test_the_catalogue_option_is_read_from_the_descriptor() -> None:
    spec = ErrorReason.DESCRIPTOR.values_by_name["RATE_LIMITED"].GetOptions().Extensions[error_reason_pb2.error]
    assert (spec.code, list(spec.metadata), spec.retry_info) == ("RESOURCE_EXHAUSTED", ["limit", "per_minute"], True)
    assert CATALOGUE["RATE_LIMITED"].metadata == {"limit", "per_minute"}


# ---- (a) the code, read without a server ---------------------------------------------


def test_no_reason_is_written_as_a_string_where_an_error_is_made() -> None:
    literals = [
        f"{call.where}: {call.helper}(... {arg.value!r} ...)"
        for call in _calls()
        for arg in [*call.node.args, *(k.value for k in call.node.keywords)]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and REASON_LIKE.fullmatch(arg.value)
    ]
    assert not literals, "pass ErrorReason.<NAME> (protos/towerco/api/v1/error_reason.proto):\n" + "\n".join(literals)


def test_every_reason_the_code_names_is_catalogued() -> None:
    named = list(_named_reasons())
    assert len(named) > 40, "the scan found too few reasons: is it still reading the code?"
    missing = [f"{where}: ErrorReason.{name}" for where, name in named if name not in CATALOGUE]
    assert not missing, "not in protos/towerco/api/v1/error_reason.proto:\n" + "\n".join(missing)


def test_errors_are_built_by_the_helpers_only() -> None:
    direct = [
        call.where for call in _calls() if call.helper == "ServiceError" and "runtime/errors.py" not in call.where
    ]
    assert not direct, f"build errors with the helpers of services/runtime/errors.py: {direct}"


def test_each_literal_reason_goes_through_the_helper_of_its_catalogued_code() -> None:
    wrong = []
    for call in _calls():
        reason = _reason_of(call)
        if call.helper not in HELPER_CODES or reason is None or reason not in CATALOGUE:
            continue
        if CATALOGUE[reason].code != HELPER_CODES[call.helper]:
            wrong.append(f"{call.where}: {reason} is {CATALOGUE[reason].code.name}, not {call.helper}")
    assert not wrong, "\n".join(wrong)


def test_each_literal_reason_gets_its_catalogued_metadata_keys() -> None:
    wrong, checked = [], 0
    for call in _calls():
        reason = _reason_of(call)
        if call.helper not in HELPER_CODES or reason is None or reason not in CATALOGUE:
            continue
        if any(k.arg is None for k in call.node.keywords):
            continue  # **metadata: left to the run-time check
        keys = FIXED_METADATA.get(call.helper) or {
            k.arg for k in call.node.keywords if k.arg and k.arg not in NOT_METADATA
        }
        checked += 1
        entry = CATALOGUE[reason]
        if not entry.metadata <= keys <= entry.metadata | entry.optional_metadata:
            wrong.append(f"{call.where}: {reason} with {sorted(keys)}, catalogued {sorted(CATALOGUE[reason].metadata)}")
    assert checked > 30, checked
    assert not wrong, "\n".join(wrong)


def test_every_reason_the_gateways_lua_returns_is_catalogued_and_rendered() -> None:
    rendered = {error_catalogue.name(r) for r in gateway_reasons(GatewaySettings())}
    found = {
        (path.name, literal)
        for path in LUA
        for literal in re.findall(r"\"([^\"]*)\"", _lua_code(path.read_text()))
        if REASON_LIKE.fullmatch(literal)
    }
    returned = {literal for name, literal in found if name == GRPC_REPLIES_LUA.name}
    assert returned, "the scan found no reason in grpc_replies.lua"
    uncatalogued = sorted(f"{name}: {literal!r}" for name, literal in found if literal not in CATALOGUE)
    assert not uncatalogued, f"not in protos/towerco/api/v1/error_reason.proto: {uncatalogued}"
    assert returned <= rendered, f"returned by the Lua but not rendered into REPLIES: {returned - rendered}"


def test_the_gateways_rendered_replies_carry_their_catalogued_code() -> None:
    config = render_json(GatewaySettings(jwt_jwks_file="/dev/null", targets=_targets()))
    details = re.findall(r'details = \\"([A-Za-z0-9+/]+)\\"', config)
    assert len(details) >= len(gateway_reasons(GatewaySettings())), config[:200]
    for raw in details:
        status = status_pb2.Status.FromString(base64.b64decode(raw + "=" * (-len(raw) % 4)))
        assert_catalogued(status)


def _targets() -> dict[str, str]:
    return {api.cluster: "127.0.0.1:1" for api in apis()}


# ---- (b) the run-time guard ----------------------------------------------------------


def test_a_helper_refuses_a_reason_the_catalogue_lacks() -> None:
    with pytest.raises(CatalogueError, match="not a catalogued reason"):
        permission_denied("no", 9999)  # type: ignore[arg-type]


def test_a_helper_refuses_a_reason_written_as_a_string() -> None:
    with pytest.raises(CatalogueError, match="pass an ErrorReason value"):
        unavailable("no", "DATABASE_UNAVAILABLE")  # type: ignore[arg-type]


def test_an_error_built_by_hand_with_an_uncatalogued_reason_is_refused() -> None:
    with pytest.raises(CatalogueError, match="not in the catalogue"):
        ServiceError(grpc.StatusCode.PERMISSION_DENIED, "no", "SOMETHING_NEW")


def test_a_reason_sent_with_another_code_is_refused() -> None:
    with pytest.raises(CatalogueError, match="catalogued as PERMISSION_DENIED"):
        ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "no", "CROSS_TENANT_DENIED")


def test_a_reason_sent_with_other_metadata_keys_is_refused() -> None:
    with pytest.raises(CatalogueError, match="token_tenant"):
        permission_denied("no", ErrorReason.CROSS_TENANT_DENIED, token_tenant="a")


def test_a_reason_sent_without_its_retry_info_is_refused() -> None:
    with pytest.raises(CatalogueError, match="RetryInfo"):
        resource_exhausted("no", ErrorReason.RATE_LIMITED, limit="rpm_read", per_minute="1")


def test_not_found_and_already_exists_take_only_a_resource_reason() -> None:
    assert not_found(ErrorReason.SITE_NOT_FOUND, "s1").metadata == {"resource": "site", "name": "s1"}
    with pytest.raises(CatalogueError, match="_NOT_FOUND"):
        not_found(ErrorReason.TENANT_UNKNOWN, "t")


def test_the_wire_reason_is_the_enum_value_name() -> None:
    error = invalid_argument([FieldViolation("page_token", "bad")], reason=ErrorReason.INVALID_PAGE_TOKEN)
    info = error_details_pb2.ErrorInfo()
    error.to_status("towerco.sites.v1.SitesService").details[0].Unpack(info)
    assert (info.reason, info.domain) == ("INVALID_PAGE_TOKEN", "towerco.sites.v1.SitesService")


# ---- (c) what the tests receive ------------------------------------------------------


def test_a_received_error_with_an_uncatalogued_reason_fails_the_test_that_decodes_it() -> None:
    status = status_pb2.Status(code=grpc.StatusCode.PERMISSION_DENIED.value[0], message="no")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="SOMETHING_NEW", domain="x"))
    with pytest.raises(CatalogueError, match="SOMETHING_NEW"):
        assert_catalogued(status)


def test_a_received_error_with_its_catalogued_code_keys_and_retry_info_passes() -> None:
    status = unavailable("later", ErrorReason.SHUTTING_DOWN).to_status("towerco.sites.v1.SitesService")
    assert_catalogued(status)
