"""The browser frontend under ``gateway/web``, served by the gateway and driven in Chromium.

The page is built with a real gRPC-web client from npm (``make web``). A headless Chromium
(Debian's ``chromium``, driven by ``playwright-core``) opens it on a tenant's subdomain,
signs in with a dev token, and must show the tenant's branding and only its sites. Its
styles are stylesheets of its own origin only (the gateway's CSP has no 'unsafe-inline'):
app.css, then the tenant's custom CSS as /branding.css (GetBrandingStylesheet, transcoded
by Envoy on that route). A screenshot is kept in ``test-output/screenshots/``.

Without a browser or Node.js on the machine the browser test says so and is skipped; in
CI (``CI`` set) it fails instead, since CI installs both.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from towerco.features.v1 import feature_gate_service_pb2 as features_pb
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb

from gateway.config import GatewaySettings, stylesheet_path

from .support import bearer

pytestmark = pytest.mark.stack

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "gateway" / "web"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = REPO / "test-output" / "screenshots"


def _missing_for_browser() -> str | None:
    if not (WEB / "dist" / "index.html").is_file():
        return "the web page is not built: `make web` needs npm (Node.js)"
    if shutil.which("node") is None:
        return "Node.js is not installed, so playwright-core cannot drive the browser"
    if not (WEB / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed in gateway/web (run `make web`)"
    if not CHROMIUM.is_file():
        return f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; or set CHROMIUM)"
    return None


def _lacking(reason: str) -> None:
    """Skip, saying what the machine lacks; in CI, which installs all of it, fail instead."""
    if os.environ.get("CI"):
        pytest.fail(f"CI installs what this test needs, yet: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Path:
    reason = _missing_for_browser()
    if reason is not None:
        _lacking(reason)
    return CHROMIUM


#: The branded tenant's custom CSS: the company name's colour and the page's background.
CUSTOM_CSS = "h1 { color: #7B2D8E; }\nmain { background-color: #FEF3C7; }\n"
CSS_NAME_COLOR = "rgb(123, 45, 142)"
CSS_MAIN_BACKGROUND = "rgb(254, 243, 199)"
#: What the page shows without the tenant's CSS: app.css's white heading, no background.
DEFAULT_NAME_COLOR = "rgb(255, 255, 255)"
TRANSPARENT = "rgba(0, 0, 0, 0)"
#: The platform's primary colour (#3B82F6), GetBranding's for a tenant without custom_branding.
PLATFORM_PRIMARY = "rgb(59, 130, 246)"


@pytest.fixture
def branded(new_tenant, registry, sites, token: Callable[..., str]) -> str:
    """A tenant with its own colours, custom CSS and company name, and three sites."""
    tenant: str = new_tenant("web", display_name="Kilimanjaro Towers Ltd", plan="enterprise")  # custom_branding
    settings = tenant_pb.TenantSettings(
        branding=tenant_pb.Branding(company_name="Kilimanjaro Towers", primary_color="#0A7E3D", custom_css=CUSTOM_CSS)
    )
    request = tenant_pb.UpdateTenantSettingsRequest(settings=settings)
    request.update_mask.paths.extend(["branding.company_name", "branding.primary_color", "branding.custom_css"])
    registry.UpdateTenantSettings(request, metadata=bearer(token(tenant)), timeout=10)
    for n in (1, 2, 3):
        sites.CreateSite(
            sites_pb.CreateSiteRequest(site_id=f"KT-{n:03d}", site=sites_pb.Site(name=f"Kilimanjaro mast {n}")),
            metadata=bearer(token(tenant)),
            timeout=10,
        )
    return tenant


def browse(browser: Path, url: str, token: str, screenshot: Path, *resolver_rules: str) -> dict[str, Any]:
    """The page at ``url`` as headless Chromium shows it (e2e/browse.mjs's report);
    ``resolver_rules`` are Chromium's --host-resolver-rules, e.g. ``MAP a.example 127.0.0.1``."""
    command = [
        "node",
        "e2e/browse.mjs",
        "--url",
        url,
        "--token",
        token,
        "--screenshot",
        str(screenshot),
        "--chromium",
        str(browser),
        *(["--host-resolver-rules", ", ".join(resolver_rules)] if resolver_rules else []),
    ]
    result = subprocess.run(command, cwd=WEB, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"browser run failed ({result.returncode}):\n{result.stderr}\n{result.stdout}"
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


def test_the_page_signs_in_themes_itself_and_lists_the_tenants_sites(gateway, browser, branded, token, tenant_pair):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    url = f"http://{branded}.localhost:{gateway.port}/"
    shot = SCREENSHOTS / "web-page-signed-in.png"
    shot.unlink(missing_ok=True)
    report = browse(browser, url, token(branded), shot)
    assert report["error"] in (None, ""), report
    assert report["companyName"] == "Kilimanjaro Towers"
    assert report["primaryColor"] == "rgb(10, 126, 61)"  # #0A7E3D from GetBranding
    assert sorted(report["siteIds"]) == ["KT-001", "KT-002", "KT-003"]
    assert report["consoleErrors"] == [], report
    _shows_the_tenants_css(report)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Another tenant's token on this tenant's page: the gateway's tenant wins, the call is refused.
    foreign = browse(browser, url, token(tenant_pair[1]), SCREENSHOTS / "web-page-foreign-token.png")
    assert foreign["siteIds"] == []
    assert foreign["error"] and "denied" in foreign["error"].lower(), foreign

    # A refusal by the gateway itself reads as a gRPC status too, not as a failed HTTP request.
    expired = browse(browser, url, token(branded, ttl=-120), SCREENSHOTS / "web-page-expired-token.png")
    assert expired["siteIds"] == []
    assert expired["error"].startswith("unauthenticated: the token has expired"), expired
    assert expired["consoleErrors"] == [] and expired["failedRequests"] == [], expired


def _get(settings: GatewaySettings, path: str, host: str, **headers: str) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", settings.port, timeout=10)
    connection.request("GET", path, headers={"Host": host, **headers})
    response = connection.getresponse()
    response.body = response.read()  # type: ignore[attr-defined]
    connection.close()
    return response


def test_the_gateway_serves_the_page_with_a_strict_content_policy(gateway):
    if gateway.web_dir is None:
        _lacking("the web page is not built: `make web` needs npm (Node.js)")
    page = _get(gateway, "/", f"tenant_a.localhost:{gateway.port}")
    assert page.status == 200
    assert page.getheader("content-type") == "text/html; charset=utf-8"
    policy = page.getheader("content-security-policy") or ""
    assert "default-src 'self'" in policy and "connect-src 'self'" in policy
    # Styles are stylesheets of the page's origin only: no inline style element or attribute.
    assert "style-src 'self';" in policy and "unsafe-inline" not in policy, policy
    page_text = page.body.decode()  # type: ignore[attr-defined]
    assert "<style" not in page_text and " style=" not in page_text
    assert f'<link rel="stylesheet" href="{stylesheet_path()}">' in page_text
    sheet = _get(gateway, "/app.css", f"tenant_a.localhost:{gateway.port}")
    assert sheet.status == 200 and sheet.getheader("content-type") == "text/css; charset=utf-8"
    assert b"app.js" in page.body  # type: ignore[attr-defined]
    script = _get(gateway, "/app.js", f"tenant_a.localhost:{gateway.port}")
    assert script.status == 200
    assert script.getheader("content-type") == "text/javascript"
    assert script.getheader("x-content-type-options") == "nosniff"


def _shows_the_tenants_css(report: dict[str, Any]) -> None:
    """The tenant's custom CSS applied as /branding.css, under a CSP that applies nothing inline."""
    assert report["stylesheets"] == ["/app.css", stylesheet_path()], report
    assert report["companyNameColor"] == CSS_NAME_COLOR, report
    assert report["mainBackground"] == CSS_MAIN_BACKGROUND, report
    assert report["cspViolations"] == [], report
    assert report["inlineStyleApplied"] is False, report


def _set_plan(features, platform_token: str, tenant: str, plan: str) -> None:
    features.SetTenantPlan(
        features_pb.SetTenantPlanRequest(tenant_id=tenant, plan=plan), metadata=bearer(platform_token), timeout=10
    )


def test_a_tenant_without_custom_branding_sees_the_platform_theme_and_back_after_an_upgrade(
    gateway, browser, branded, registry, features, platform_token, eventually
):
    url = f"http://{branded}.localhost:{gateway.port}/"

    def served_primary(expected: str) -> None:
        shown = registry.GetBranding(tenant_pb.GetBrandingRequest(tenant_id=branded), timeout=10)
        assert shown.primary_color.upper() == expected

    _set_plan(features, platform_token, branded, "professional")  # no custom_branding
    eventually(lambda: served_primary("#3B82F6"), within=5)
    plain = browse(browser, url, "", SCREENSHOTS / "web-page-platform-theme.png")
    assert plain["companyName"] == "Kilimanjaro Towers"  # the name is the tenant's on every plan
    assert plain["primaryColor"] == PLATFORM_PRIMARY
    assert plain["companyNameColor"] == DEFAULT_NAME_COLOR  # its stored CSS is not served
    assert plain["mainBackground"] == TRANSPARENT
    assert plain["stylesheets"] == ["/app.css", stylesheet_path()], plain
    assert plain["cspViolations"] == [] and plain["consoleErrors"] == [], plain

    _set_plan(features, platform_token, branded, "enterprise")
    eventually(lambda: served_primary("#0A7E3D"), within=5)
    themed = browse(browser, url, "", SCREENSHOTS / "web-page-tenant-theme.png")
    assert themed["primaryColor"] == "rgb(10, 126, 61)"
    _shows_the_tenants_css(themed)
    assert themed["consoleErrors"] == [], themed


def test_the_gateway_serves_each_hosts_tenant_its_own_stylesheet(gateway, branded, registry, tenant_pair):
    if gateway.web_dir is None:
        _lacking("the web page is not built: `make web` needs npm (Node.js)")
    port = gateway.port
    sheet = _get(gateway, stylesheet_path(), f"{branded}.localhost:{port}")
    assert sheet.status == 200, sheet.body  # type: ignore[attr-defined]
    assert sheet.getheader("content-type") == "text/css; charset=utf-8"
    assert sheet.getheader("x-content-type-options") == "nosniff"
    served = registry.GetBranding(tenant_pb.GetBrandingRequest(tenant_id=branded), timeout=10).custom_css
    assert served and sheet.body == served.encode()  # type: ignore[attr-defined]
    assert b"7b2d8e" in sheet.body.lower()  # type: ignore[attr-defined]

    # Another tenant's host: its own sheet (it has none), never the branded tenant's.
    other = _get(gateway, stylesheet_path(), f"{tenant_pair[0]}.localhost:{port}")
    assert (other.status, other.getheader("content-type"), other.body) == (200, "text/css; charset=utf-8", b"")  # type: ignore[attr-defined]

    # A tenant header of the client's own is removed at the edge: the host's tenant it is.
    spoofed = _get(gateway, stylesheet_path(), f"{tenant_pair[0]}.localhost:{port}", **{"x-tenant-id": branded})
    assert (spoofed.status, spoofed.body) == (200, b"")  # type: ignore[attr-defined]

    # A host that names no tenant, and a tenant that does not exist: refusals, not a sheet,
    # with the service's google.rpc.Status as JSON (the transcoder's convert_grpc_status).
    assert _get(gateway, stylesheet_path(), f"localhost:{port}", **{"x-tenant-id": branded}).status == 401
    for host, status, reason in (
        (f"localhost:{port}", 401, "TENANT_NOT_IDENTIFIED"),
        (f"no_such_tenant.localhost:{port}", 404, "TENANT_NOT_FOUND"),
    ):
        refused = _get(gateway, stylesheet_path(), host)
        assert (refused.status, refused.getheader("content-type")) == (status, "application/json"), host
        (info,) = json.loads(refused.body)["details"]  # type: ignore[attr-defined]
        assert info["reason"] == reason, info


def test_the_page_on_a_custom_domain_shows_the_tenants_theme_and_sites(
    gateway, browser, branded, registry, platform_token, token
):
    """Issue 19's acceptance in Chromium: a domain added through the registry serves the page,
    themed with the tenant's colours and CSS, with no CSP violation (Chromium reaches the
    domain through --host-resolver-rules, no DNS)."""
    domain = f"aiops.{branded.replace('_', '-')}.example"
    registry.AddCustomDomain(
        tenant_pb.AddCustomDomainRequest(tenant_id=branded, domain=domain), metadata=bearer(platform_token), timeout=10
    )
    host = f"{domain}:{gateway.port}"
    deadline = time.monotonic() + 5  # the gateway routes a new domain within 5 s
    while (sheet := _get(gateway, stylesheet_path(), host)).status != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sheet.status == 200 and b"7b2d8e" in sheet.body.lower(), sheet.body  # type: ignore[attr-defined]

    shot = SCREENSHOTS / "web-page-custom-domain.png"
    report = browse(browser, f"http://{host}/", token(branded), shot, f"MAP {domain} 127.0.0.1")
    assert report["error"] in (None, ""), report
    assert report["companyName"] == "Kilimanjaro Towers"
    assert report["primaryColor"] == "rgb(10, 126, 61)"
    assert sorted(report["siteIds"]) == ["KT-001", "KT-002", "KT-003"]
    _shows_the_tenants_css(report)
    assert report["consoleErrors"] == [] and report["failedRequests"] == [], report
