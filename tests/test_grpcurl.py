"""The sites service as an operator sees it with the real ``grpcurl`` binary.

Server reflection must describe the API, and JSON in / JSON out must work with a bearer
token, so the service can be explored and scripted without the .proto files. Through the
gateway (no reflection there) the README's own commands are run as pasted, with only the
ports, tenant and tokens of the test stack put in.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from towerco.sites.v1 import sites_service_pb2 as pb

from deploy.local.grpcurl import GATEWAY_FLAGS
from services.runtime.settings import DEFAULT_PORTS

from .support import bearer

REPO = Path(__file__).resolve().parents[1]
GRPCURL = Path(sys.executable).parent / "grpcurl"
SERVICE = "towerco.sites.v1.SiteService"
#: grpcurl exits with 64 + the gRPC status code when the call fails.
STATUS_EXIT_OFFSET = 64
UNAUTHENTICATED_EXIT = STATUS_EXIT_OFFSET + 16
INVALID_ARGUMENT_EXIT = STATUS_EXIT_OFFSET + 3
NOT_FOUND_EXIT = STATUS_EXIT_OFFSET + 5
PERMISSION_DENIED_EXIT = STATUS_EXIT_OFFSET + 7


@dataclass
class Grpcurl:
    target: str

    def run(self, *args: str, token: str | None = None, data: Any = None) -> subprocess.CompletedProcess[str]:
        """``grpcurl -plaintext [-H auth] [-d json] <flags/args...>`` with the target before the verb."""
        flags = ["-plaintext", "-connect-timeout", "10", "-max-time", "20"]
        if token is not None:
            flags += ["-H", f"authorization: Bearer {token}"]
        if data is not None:
            flags += ["-d", data if isinstance(data, str) else json.dumps(data)]
        verb = list(args)
        command = [str(GRPCURL), *flags, self.target, *verb]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    def call(self, method: str, data: Any, token: str) -> dict[str, Any]:
        """A call that must succeed; its JSON response."""
        result = self.run(f"{SERVICE}/{method}", token=token, data=data)
        assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
        parsed: dict[str, Any] = json.loads(result.stdout)
        return parsed


@pytest.fixture(scope="module")
def grpcurl(sites_target: str) -> Grpcurl:
    assert GRPCURL.is_file(), f"grpcurl not installed in the venv at {GRPCURL}"
    return Grpcurl(sites_target)


def test_list_shows_the_site_service_via_reflection(grpcurl: Grpcurl) -> None:
    result = grpcurl.run("list")
    assert result.returncode == 0, result.stderr
    services = result.stdout.split()
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services
    result = grpcurl.run("list", SERVICE)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == sorted(
        f"{SERVICE}.{m}" for m in ("CreateSite", "DeleteSite", "GetSite", "GetSiteAnalytics", "ListSites", "UpdateSite")
    )


def test_describe_service_and_messages(grpcurl: Grpcurl) -> None:
    result = grpcurl.run("describe", SERVICE)
    assert result.returncode == 0, result.stderr
    assert f"{SERVICE} is a service" in result.stdout
    assert "rpc CreateSite ( .towerco.sites.v1.CreateSiteRequest ) returns ( .towerco.sites.v1.Site )" in result.stdout
    assert "rpc DeleteSite ( .towerco.sites.v1.DeleteSiteRequest ) returns ( .google.protobuf.Empty )" in result.stdout
    # The access policy option is resolvable through reflection too (its file is served).
    assert 'permission:"sites.write"' in result.stdout
    site = grpcurl.run("describe", "towerco.sites.v1.Site")
    assert site.returncode == 0, site.stderr
    # Field behaviour travels with the descriptors: grpcurl users see it.
    for field in (
        "string site_id = 1 [(.google.api.field_behavior) = IDENTIFIER];",
        "string tenant_id = 2 [(.google.api.field_behavior) = OUTPUT_ONLY];",
        ".google.protobuf.Struct configuration = 5 [(.google.api.field_behavior) = OPTIONAL];",
    ):
        assert field in site.stdout
    missing = grpcurl.run("describe", "towerco.sites.v1.NoSuchThing")
    assert missing.returncode != 0
    assert "NoSuchThing" in missing.stderr


def test_create_get_list_with_json(
    grpcurl: Grpcurl, sites: Any, token: Callable[..., str], tenant_pair: tuple[str, str]
) -> None:
    tenant, other = tenant_pair
    jwt = token(tenant)
    body = {
        "siteId": "GRPCURL-1",
        "site": {
            "name": "Made by grpcurl",
            "tenantId": other,  # ignored: the tenant comes from the token
            "location": {"latitude": -1.2921, "longitude": 36.8219, "region": "nairobi", "countryCode": "KE"},
            "configuration": {"masts": 2, "vendor": "acme", "bands": ["n78"]},
        },
        "requestId": "grpcurl-req-1",
    }
    created = grpcurl.call("CreateSite", body, jwt)
    assert created["site_id"] == "GRPCURL-1"
    assert created["tenant_id"] == tenant
    assert created["name"] == "Made by grpcurl"
    assert created["location"] == {"latitude": -1.2921, "longitude": 36.8219, "region": "nairobi", "country_code": "KE"}
    assert created["configuration"] == {"masts": 2, "vendor": "acme", "bands": ["n78"]}
    assert created["create_time"] == created["update_time"]
    assert created["create_time"].endswith("Z")

    # snake_case input works too, and the same request_id replays the same site.
    replay = grpcurl.call(
        "CreateSite",
        {
            "site_id": "GRPCURL-1",
            "request_id": "grpcurl-req-1",
            "site": {
                "name": "Made by grpcurl",
                "location": {"latitude": -1.2921, "longitude": 36.8219, "region": "nairobi", "country_code": "KE"},
                "configuration": {"masts": 2, "vendor": "acme", "bands": ["n78"]},
            },
        },
        jwt,
    )
    assert replay == created

    assert grpcurl.call("GetSite", {"site_id": "GRPCURL-1"}, jwt) == created
    listed = grpcurl.call("ListSites", {}, jwt)
    assert listed == {"sites": [created]}  # no next_page_token: a single page
    stats = grpcurl.call("GetSiteAnalytics", {}, jwt)
    assert stats == {"total_sites": "1", "sites_by_region": {"nairobi": "1"}}  # int64 as JSON strings

    # What grpcurl created is what a gRPC client reads, in the token's tenant only.
    stored = sites.GetSite(pb.GetSiteRequest(site_id="GRPCURL-1"), metadata=bearer(jwt), timeout=10)
    assert (stored.tenant_id, stored.name, stored.location.region) == (tenant, "Made by grpcurl", "nairobi")
    assert grpcurl.call("ListSites", {}, token(other)) == {}


def test_paginate_three_pages(grpcurl: Grpcurl, token: Callable[..., str], tenant_pair: tuple[str, str]) -> None:
    tenant, _ = tenant_pair
    jwt = token(tenant)
    ids = [f"page-{n}" for n in range(7)]
    for site_id in reversed(ids):
        grpcurl.call("CreateSite", {"site_id": site_id, "site": {"name": site_id}}, jwt)
    pages: list[dict[str, Any]] = []
    page_token = ""
    while True:
        request: dict[str, Any] = {"page_size": 3}
        if page_token:
            request["page_token"] = page_token
        pages.append(grpcurl.call("ListSites", request, jwt))
        page_token = pages[-1].get("next_page_token", "")
        if not page_token:
            break
        assert len(pages) < 10, "pagination does not terminate"
    assert [len(p["sites"]) for p in pages] == [3, 3, 1]
    assert ["next_page_token" in p for p in pages] == [True, True, False]
    assert [s["site_id"] for p in pages for s in p["sites"]] == ids

    # A token edited by hand is refused with the reason shown by grpcurl.
    token_text = pages[0]["next_page_token"]
    middle = len(token_text) // 2
    tampered = token_text[:middle] + ("A" if token_text[middle] != "A" else "B") + token_text[middle + 1 :]
    result = grpcurl.run(f"{SERVICE}/ListSites", token=jwt, data={"page_size": 3, "page_token": tampered})
    assert result.returncode == INVALID_ARGUMENT_EXIT, result.stderr
    assert "InvalidArgument" in result.stderr
    assert "INVALID_PAGE_TOKEN" in result.stderr


def test_call_without_token_is_unauthenticated(grpcurl: Grpcurl) -> None:
    result = grpcurl.run(f"{SERVICE}/GetSite", data={"site_id": "anything"})
    assert result.returncode == UNAUTHENTICATED_EXIT, (result.returncode, result.stderr)
    assert "Code: Unauthenticated" in result.stderr
    assert "TOKEN_MISSING" in result.stderr
    assert result.stdout == ""


def test_error_details_are_shown(grpcurl: Grpcurl, token: Callable[..., str], tenant_pair: tuple[str, str]) -> None:
    tenant, _ = tenant_pair
    jwt = token(tenant)
    bad = grpcurl.run(f"{SERVICE}/CreateSite", token=jwt, data={"site_id": "../x", "site": {"name": ""}})
    assert bad.returncode == INVALID_ARGUMENT_EXIT, bad.stderr
    assert "Code: InvalidArgument" in bad.stderr
    assert "google.rpc.BadRequest" in bad.stderr
    assert '"field":"site_id"' in bad.stderr.replace(" ", "")
    assert '"field":"site.name"' in bad.stderr.replace(" ", "")
    missing = grpcurl.run(f"{SERVICE}/GetSite", token=jwt, data={"site_id": "nope"})
    assert missing.returncode == NOT_FOUND_EXIT, missing.stderr
    assert "Code: NotFound" in missing.stderr
    assert "SITE_NOT_FOUND" in missing.stderr
    assert grpcurl.call("ListSites", {}, jwt) == {}  # nothing was written


# --- the README's commands, through the gateway -------------------------------------------

README_GATEWAY = "127.0.0.1:8080"


def readme_commands(after: str) -> list[str]:
    """The ``$GRPCURL`` commands of the README's first ``sh`` block after the text ``after``."""
    text = (REPO / "README.md").read_text()
    start = text.index(after)
    block = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    assert block is not None, f"no sh block after {after!r} in README.md"
    joined = block.group(1).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("$GRPCURL")]


@dataclass
class Readme:
    """Runs README commands in a shell, from the repository root, against the test stack."""

    ports: dict[str, str]
    tenant: str
    env: dict[str, str]

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        command = command.replace("tenant_a", self.tenant)
        for readme_address, address in self.ports.items():
            command = command.replace(readme_address, address)
        return subprocess.run(
            ["bash", "-c", command], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=60, check=False
        )


@pytest.fixture
def readme(
    stack: Any, gateway: Any, new_tenant: Callable[..., str], token: Callable[..., str], platform_token: str
) -> Readme:
    tenant = new_tenant(plan="enterprise")  # tenant_a's plan in the demo data
    ports = {README_GATEWAY: f"127.0.0.1:{gateway.port}"}
    ports.update({f"127.0.0.1:{DEFAULT_PORTS[n]}": f"127.0.0.1:{stack.config.ports[n]}" for n in DEFAULT_PORTS})
    env = {**os.environ, "GRPCURL": str(GRPCURL), "TOKEN": token(tenant), "ADMIN": platform_token}
    return Readme(ports, tenant, env)


def test_readme_gateway_examples_use_the_protoset_flags() -> None:
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    through_gateway = [line for line in text.splitlines() if "$GRPCURL" in line and README_GATEWAY in line]
    assert len(through_gateway) >= 2, through_gateway
    for line in through_gateway:
        assert f"$GRPCURL {' '.join(GATEWAY_FLAGS)} " in line, line
    assert (REPO / GATEWAY_FLAGS[-1]).is_file(), "make proto builds the descriptor set the README names"


def test_readme_gateway_error_shows_the_decoded_error_info(readme: Readme) -> None:
    listed, missing = readme_commands("In another terminal, through the gateway")[:2]
    result = readme.run(listed)
    assert result.returncode == 0, result.stderr
    assert "sites" not in json.loads(result.stdout or "{}")  # a fresh tenant has none
    result = readme.run(missing)
    assert result.returncode == NOT_FOUND_EXIT, (result.returncode, result.stderr)
    details = result.stderr.replace(" ", "")
    assert "isnotrecognized" not in details, result.stderr
    assert '"@type":"type.googleapis.com/google.rpc.ErrorInfo"' in details, result.stderr
    assert '"reason":"SITE_NOT_FOUND"' in details, result.stderr


def test_readme_feature_gate_example_runs_as_pasted(readme: Readme, eventually: Callable[..., Any]) -> None:
    commands = readme_commands("The feature gate (what each plan includes")
    methods = [command.rsplit("/", 1)[-1] for command in commands]
    # What each step must answer; a change of the README's example must change this too.
    expected = [
        ("GetEntitlements", 0),
        ("GetSiteAnalytics", 0),
        ("SetTenantPlan", 0),
        ("GetSiteAnalytics", PERMISSION_DENIED_EXIT),
        ("SetFeatureOverride", 0),
        ("GetSiteAnalytics", 0),
        ("ClearFeatureOverride", 0),
        ("SetTenantPlan", 0),
    ]
    assert methods == [method for method, _ in expected]
    for command, (method, exit_code) in zip(commands, expected, strict=True):

        def step(command: str = command, method: str = method, exit_code: int = exit_code) -> str:
            # A plan change reaches the sites service within milliseconds, not at once.
            result = readme.run(command)
            assert result.returncode == exit_code, (method, result.returncode, result.stderr)
            return result.stderr.replace(" ", "") if exit_code else result.stdout

        output = eventually(step, within=5)
        if method == "GetSiteAnalytics" and exit_code:
            assert '"reason":"FEATURE_NOT_IN_PLAN"' in output, output
            assert '"feature":"advanced_analytics"' in output, output
        elif method == "GetSiteAnalytics":
            assert json.loads(output) == {}  # no sites yet: every count is zero


def test_readme_custom_domain_example_runs_as_pasted(readme: Readme, eventually: Callable[..., Any]) -> None:
    commands = readme_commands("A tenant's own domains")
    domain = f"noc-{uuid.uuid4().hex[:8]}.acme-towers.example"  # the README's, unique to this run
    add, list_sites, remove = (command.replace("noc.acme-towers.example", domain) for command in commands)
    assert [c.rsplit("/", 1)[-1] for c in (add, list_sites, remove)] == [
        "AddCustomDomain",
        "ListSites",
        "RemoveCustomDomain",
    ]
    assert f"-authority {domain}" in list_sites

    def run(command: str, exit_code: int) -> str:
        result = readme.run(command)
        assert result.returncode == exit_code, (command, result.returncode, result.stderr)
        return result.stderr.replace(" ", "") if exit_code else result.stdout

    assert domain in json.loads(run(add, 0))["domains"]
    assert "sites" not in json.loads(eventually(lambda: run(list_sites, 0), within=5) or "{}")
    run(remove, 0)
    refused = eventually(lambda: run(list_sites, PERMISSION_DENIED_EXIT), within=5)
    assert '"reason":"TENANT_SUBDOMAIN_REQUIRED"' in refused, refused
