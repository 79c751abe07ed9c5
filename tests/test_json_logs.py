"""Logs: JSON lines in pods, each call's lines tagged, one access line per call, no token or secret.

The stack test starts a registry and a sites process of its own with ``LOG_FORMAT=json``
(their logs are files of their own), makes calls with a real JWT, writes secret settings
and has some refused, then reads every line those processes wrote.
"""

from __future__ import annotations

import io
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as pb
from towerco.tenant.v1 import tenant_registry_service_pb2_grpc as pb_grpc

from services.runtime import context, logs

from .conftest import ExtraService
from .support import bearer

HEX32 = re.compile(r"^[0-9a-f]{32}$")


def json_lines(service: ExtraService) -> list[dict[str, Any]]:
    """Every line the process wrote, each parsed: a line that is not one JSON object fails here."""
    parsed = []
    for number, line in enumerate(service.output().splitlines(), 1):
        if line.strip():
            try:
                parsed.append(json.loads(line))
            except json.JSONDecodeError:
                pytest.fail(f"{service.log_path.name}:{number} is not JSON: {line[:200]}")
    return parsed


def test_json_lines_carry_the_call_and_never_a_token_or_a_secret(
    extra_service: Callable[..., ExtraService],
    token: Callable[..., str],
    tenant_pair: tuple[str, str],
    eventually: Callable[..., Any],
) -> None:
    tenant, _ = tenant_pair
    env = {"LOG_FORMAT": "json", "LOG_LEVEL": "DEBUG"}
    registry_process, sites_process = extra_service("tenant", env), extra_service("sites", env)
    jwt = token(tenant)
    password, api_key, rejected = f"pw-{uuid.uuid4().hex}", f"sk-live-{uuid.uuid4().hex}", f"sk-bad-{uuid.uuid4().hex}"
    calls: dict[str, str] = {}  # request id -> the code its access line must say

    def md(name: str, code: grpc.StatusCode, bearer_token: str = jwt) -> tuple[tuple[str, str], ...]:
        request_id = f"logs-{name}-{uuid.uuid4().hex[:8]}"
        calls[request_id] = code.name
        return bearer(bearer_token, **{"x-request-id": request_id})

    with grpc.insecure_channel(registry_process.target) as channel:
        registry = pb_grpc.TenantRegistryServiceStub(channel)
        secrets = pb.TenantSettings(
            integrations=pb.Integrations(
                smtp=pb.SmtpSettings(host="smtp.operator.example", port=587, username="noc", password=password),
                api_keys={"pagerduty": api_key},
            )
        )
        update = pb.UpdateTenantSettingsRequest(settings=secrets)
        update.update_mask.paths.append("integrations")
        registry.UpdateTenantSettings(update, metadata=md("update", grpc.StatusCode.OK), timeout=10)
        registry.GetTenantSettings(pb.GetTenantSettingsRequest(), metadata=md("get", grpc.StatusCode.OK), timeout=10)
        refused = pb.UpdateTenantSettingsRequest(
            settings=pb.TenantSettings(integrations=pb.Integrations(api_keys={"pagerduty": rejected + "\n"}))
        )
        refused.update_mask.paths.append("integrations.api_keys")
        with pytest.raises(grpc.RpcError):
            registry.UpdateTenantSettings(refused, metadata=md("bad-secret", grpc.StatusCode.INVALID_ARGUMENT))
    with grpc.insecure_channel(sites_process.target) as channel:
        sites = sites_grpc.SiteServiceStub(channel)
        sites.ListSites(sites_pb.ListSitesRequest(), metadata=md("list", grpc.StatusCode.OK), timeout=10)
        with pytest.raises(grpc.RpcError):
            sites.GetSite(sites_pb.GetSiteRequest(site_id="nope"), metadata=md("missing", grpc.StatusCode.NOT_FOUND))
        # A token that fails verification (its signature cut short) is not written down either.
        with pytest.raises(grpc.RpcError):
            sites.ListSites(
                sites_pb.ListSitesRequest(), metadata=md("forged", grpc.StatusCode.UNAUTHENTICATED, jwt[:-4] + "AAAA")
            )

    def access_lines() -> dict[str, dict[str, Any]]:
        lines = [line for p in (registry_process, sites_process) for line in json_lines(p)]
        found = {line["request_id"]: line for line in lines if line["logger"] == "towerco.access"}
        assert set(calls) <= set(found), sorted(set(calls) - set(found))
        return found

    access = eventually(access_lines, within=5.0, interval=0.05)
    everything = registry_process.output() + sites_process.output()
    for secret in (jwt, jwt[:-4] + "AAAA", jwt.split(".")[1], jwt.split(".")[2], password, api_key, rejected):
        assert secret not in everything

    lines = json_lines(registry_process) + json_lines(sites_process)
    keys = {"ts", "level", "logger", "service", "message", "tenant", "request_id", "trace_id", "span_id"}
    for line in lines:
        assert keys <= set(line), line
    for request_id, code in calls.items():
        line = access[request_id]
        assert [other["logger"] for other in lines if other["request_id"] == request_id].count("towerco.access") == 1
        assert line["level"] == "INFO"
        assert line["code"] == code
        assert line["method"].startswith("/towerco.")
        assert isinstance(line["duration_ms"], float)
        assert HEX32.match(line["trace_id"]), line
        # Refused before it is known whose it is: the forged token's call has no tenant.
        assert line["tenant"] == ("-" if code == "UNAUTHENTICATED" else tenant), line
    # Every line written during a call carries its request id and trace id (DEBUG shows the inner ones).
    during = [line for line in lines if line["request_id"] in calls]
    assert len(during) > len(calls), "only the access lines were written during the calls"
    for line in during:
        assert HEX32.match(line["trace_id"]), line
    by_trace = {line["request_id"]: line["trace_id"] for line in during if line["logger"] == "towerco.access"}
    assert all(line["trace_id"] == by_trace[line["request_id"]] for line in during)


@pytest.fixture
def captured() -> Iterator[Callable[[str], io.StringIO]]:
    """``captured(format)``: the root logger writes into a buffer in that format, as a service's does."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def configure(log_format: str) -> io.StringIO:
        logs.configure("sites", "INFO", log_format)
        buffer = io.StringIO()
        root.handlers[0].setStream(buffer)  # type: ignore[attr-defined]
        return buffer

    yield configure
    root.handlers[:] = handlers
    root.setLevel(level)


JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz_-x"


@pytest.mark.parametrize("log_format", logs.FORMATS)
def test_anything_shaped_like_a_jwt_is_redacted_whoever_logs_it(
    captured: Callable[[str], io.StringIO], log_format: str
) -> None:
    buffer = captured(log_format)
    log = logging.getLogger("towerco.test")
    log.warning("header was Bearer %s", JWT, extra={"sent": f"authorization: Bearer {JWT}"})
    try:
        raise ValueError(f"bad token {JWT}")
    except ValueError:
        log.exception("failed")
    written = buffer.getvalue()
    assert JWT not in written and JWT.split(".")[2] not in written
    assert written.count(logs.REDACTED) == 3 if log_format == "json" else written.count(logs.REDACTED) >= 2


def test_a_json_line_is_one_object_with_the_calls_tenant_and_request(captured: Callable[[str], io.StringIO]) -> None:
    buffer = captured("json")
    with context.bind(context.RequestContext(request_id="req-1", method="/x", tenant_id="acme")):
        logging.getLogger("towerco.test").info("two\nlines", extra={"site_count": 3})
    (line,) = buffer.getvalue().splitlines()
    parsed = json.loads(line)
    assert parsed["message"] == "two\nlines"
    assert (parsed["tenant"], parsed["request_id"], parsed["site_count"]) == ("acme", "req-1", 3)
    assert (parsed["level"], parsed["logger"], parsed["service"]) == ("INFO", "towerco.test", "sites")
    assert parsed["trace_id"] == "-"  # outside any span
