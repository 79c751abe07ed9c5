"""Branding by plan through the running registry and feature gate.

A tenant's own theme (logo, colours, custom CSS) needs ``custom_branding`` (enterprise):
without it an update of the theme is refused with nothing written, GetBranding serves the
platform's theme with the tenant's names, and a plan change through the feature gate
hides or brings back the stored theme within moments, with no call to the registry.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from towerco.features.v1 import feature_gate_service_pb2 as features_pb
from towerco.tenant.v1 import tenant_registry_service_pb2 as pb

from services.tenant import branding, records, tenant_settings_rules

from .support import bearer, expect_error
from .support.requests import create_tenant
from .test_custom_css import meaning

THEME = pb.Branding(
    logo_url="https://cdn.acme-towers.example/logo.svg",
    primary_color="#0A7E3D",
    secondary_color="#123456",
    custom_css="header h1 { color: #FFEE00 }",
)
PLATFORM = ("", "#3B82F6", "#6B7280", "")
#: Enough for a plan change to reach the registry's memory (Redis notice) on a busy machine.
PROMPTLY = 2.0


def theme(branding: pb.Branding) -> tuple[str, str, str, str]:
    return branding.logo_url, branding.primary_color, branding.secondary_color, branding.custom_css


def update(registry: Any, md: Any, branding: pb.Branding, *paths: str, tenant_id: str = "") -> pb.TenantSettings:
    request = pb.UpdateTenantSettingsRequest(settings=pb.TenantSettings(tenant_id=tenant_id, branding=branding))
    request.update_mask.paths.extend(paths)
    settings: pb.TenantSettings = registry.UpdateTenantSettings(request, metadata=md, timeout=10)
    return settings


def refused(registry: Any, md: Any, branding: pb.Branding, *paths: str, tenant_id: str = "") -> Any:
    request = pb.UpdateTenantSettingsRequest(settings=pb.TenantSettings(tenant_id=tenant_id, branding=branding))
    request.update_mask.paths.extend(paths)
    return expect_error(registry.UpdateTenantSettings, request, metadata=md)


def get_branding(registry: Any, tenant_id: str) -> pb.Branding:
    branding: pb.Branding = registry.GetBranding(pb.GetBrandingRequest(tenant_id=tenant_id), timeout=10)
    return branding


def set_plan(features: Any, platform_token: str, tenant_id: str, plan: str) -> None:
    features.SetTenantPlan(
        features_pb.SetTenantPlanRequest(tenant_id=tenant_id, plan=plan), metadata=bearer(platform_token), timeout=10
    )


async def stored_branding(admin: Any, tenant_id: str) -> dict[str, Any]:
    raw = await admin.fetchval("SELECT document::text FROM tenant.tenant_settings WHERE tenant_id = $1", tenant_id)
    branding: dict[str, Any] = json.loads(raw)["settings"]["branding"]
    return branding


# --- branding by plan -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("paths", "change"),
    [
        (("branding.logo_url",), pb.Branding(logo_url=THEME.logo_url)),
        (("branding.primary_color",), pb.Branding(primary_color="#0A7E3D")),
        (("branding.secondary_color",), pb.Branding(secondary_color="#123456")),
        (("branding.custom_css",), pb.Branding(custom_css=THEME.custom_css)),
        (("branding",), pb.Branding(company_name="Basic Towers", primary_color="#0A7E3D")),
        ((), pb.Branding(company_name="Basic Towers", logo_url=THEME.logo_url)),  # empty mask: every part
    ],
    ids=["logo_url", "primary_color", "secondary_color", "custom_css", "branding_whole", "empty_mask"],
)
async def test_a_theme_change_without_custom_branding_is_refused_and_nothing_is_written(
    registry, new_tenant, token, platform_token, admin, paths, change
):
    tenant = new_tenant("brb", plan="basic")
    before = await stored_branding(admin, tenant)
    for md, tenant_id in ((bearer(token(tenant)), ""), (bearer(platform_token), tenant)):  # its admin, or ours
        error = refused(registry, md, change, *paths, tenant_id=tenant_id)
        assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "FEATURE_NOT_IN_PLAN"), error
        assert error.info is not None
        assert dict(error.info.metadata) == {"feature": "custom_branding", "plan": "basic", "decided_by": "NOT_IN_PLAN"}
        assert "custom_branding" in error.message and "basic" in error.message
    assert await stored_branding(admin, tenant) == before
    assert theme(get_branding(registry, tenant)) == PLATFORM


def test_without_custom_branding_the_company_name_changes_and_the_platform_theme_is_served(registry, new_tenant, token):
    tenant = new_tenant("brn", plan="professional", display_name="Savanna Towers Ltd")
    md = bearer(token(tenant))
    # The name is any plan's; the theme fields sent at their platform values change nothing.
    settings = update(registry, md, pb.Branding(company_name="Savanna", primary_color="#3B82F6"), "branding")
    assert settings.branding.company_name == "Savanna"
    branding = get_branding(registry, tenant)
    assert (branding.company_name, branding.display_name) == ("Savanna", "Savanna Towers Ltd")
    assert theme(branding) == PLATFORM


def test_a_theme_withheld_by_an_override_is_refused_so(registry, features, new_tenant, token, platform_token):
    tenant = new_tenant("brw", plan="enterprise")
    features.SetFeatureOverride(
        features_pb.SetFeatureOverrideRequest(tenant_id=tenant, feature="custom_branding", enabled=False),
        metadata=bearer(platform_token),
        timeout=10,
    )
    error = refused(registry, bearer(token(tenant)), pb.Branding(primary_color="#0A7E3D"), "branding.primary_color")
    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "FEATURE_WITHHELD_BY_OVERRIDE"), error
    assert error.info is not None and error.info.metadata["feature"] == "custom_branding"


async def test_enterprise_theme_is_served_hidden_after_a_downgrade_and_back_after_an_upgrade(
    registry, features, new_tenant, token, platform_token, admin, eventually
):
    tenant = new_tenant("bre", plan="enterprise", display_name="Acme Towers Ltd")
    md = bearer(token(tenant))
    branding = pb.Branding(company_name="Acme")
    branding.MergeFrom(THEME)
    update(registry, md, branding, "branding")
    served = get_branding(registry, tenant)
    assert theme(served) == theme(THEME)
    assert (served.company_name, served.display_name) == ("Acme", "Acme Towers Ltd")

    set_plan(features, platform_token, tenant, "basic")

    def hidden() -> None:
        shown = get_branding(registry, tenant)
        assert theme(shown) == PLATFORM, shown
        assert (shown.company_name, shown.display_name) == ("Acme", "Acme Towers Ltd")

    eventually(hidden, within=PROMPTLY)
    # Kept: the tenant's settings still hold it, and the stored row is untouched.
    kept = registry.GetTenantSettings(pb.GetTenantSettingsRequest(), metadata=md, timeout=10)
    assert theme(kept.branding) == theme(THEME)
    stored = await stored_branding(admin, tenant)
    assert (stored["primaryColor"], stored["customCss"]) == (THEME.primary_color, THEME.custom_css)
    # On basic a new colour is refused; the company name is not.
    error = refused(registry, md, pb.Branding(primary_color="#654321"), "branding.primary_color")
    assert error.reason == "FEATURE_NOT_IN_PLAN", error
    update(registry, md, pb.Branding(company_name="Acme East"), "branding.company_name")

    set_plan(features, platform_token, tenant, "enterprise")

    def back() -> None:
        shown = get_branding(registry, tenant)
        assert theme(shown) == theme(THEME), shown
        assert shown.company_name == "Acme East"

    eventually(back, within=PROMPTLY)


def test_a_downgraded_tenant_may_clear_its_stored_theme(registry, features, new_tenant, token, platform_token):
    tenant = new_tenant("brc", plan="enterprise")
    md = bearer(token(tenant))
    update(registry, md, THEME, "branding")
    set_plan(features, platform_token, tenant, "basic")
    # Back to the platform's values grants nothing: allowed on any plan.
    cleared = update(registry, md, pb.Branding(), "branding.logo_url", "branding.primary_color", "branding.custom_css")
    assert (cleared.branding.logo_url, cleared.branding.primary_color, cleared.branding.custom_css) == (
        "",
        "#3B82F6",
        "",
    )
    assert cleared.branding.secondary_color == THEME.secondary_color  # not named: kept


def test_get_branding_reads_the_cached_branding_as_json_format_does() -> None:
    settings = tenant_settings_rules.default_settings("t_x", "Operator X")
    settings.branding.MergeFrom(THEME)
    settings.branding.company_name = "X \u00e9 \U0001f600"
    value = {"display_name": "Operator X", "settings": json_format.MessageToDict(settings)}  # as records caches it
    assert branding.from_cached(value) == records.settings_from_value(value).branding == settings.branding


# --- safe custom CSS ---------------------------------------------------------------------

LOGO = "https://cdn.acme-towers.example/brand/logo.svg"
SHEET = "header h1 { color: #FFEE00 }"
#: (id, sheet, where the refusal must point, a word it must name)
HOSTILE: list[tuple[str, str, str, str]] = [
    ("import", "h1 { color: red }\n@import 'https://evil.example/x.css';", "line 2, column 1", "@import"),
    ("import_spelled_by_escapes", "h1 { color: red }\n\n@\\69 mport 'x.css';", "line 3, column 1", "@import"),
    (
        "font_face",
        "@font-face { font-family: x; src: url(https://evil.example/f.woff) }",
        "line 1, column 1",
        "@font-face",
    ),
    ("remote_url", "h1 {\n  background: url(https://evil.example/x.png)\n}", "line 2, column 15", "evil.example"),
    (
        "url_spelled_by_escapes",
        "h1 {\n  background: \\75 rl(https://evil.example/x)\n}",
        "line 2, column 15",
        "evil.example",
    ),
    ("expression", "h1 { color: expression(alert(1)) }", "line 1, column 13", "expression"),
    ("expression_spelled_by_escapes", "h1 { color: \\65xpression(alert(1)) }", "line 1, column 13", "expression"),
    ("javascript_url", "h1 { background: url('javascript:alert(1)') }", "line 1, column 18", "javascript:"),
    ("end_style", "h1 { color: red }\n</style><script>alert(1)</script>", "line 2, column 1", "'<'"),
    ("oversized", "h1 { color: red }\n" + "/* padding */\n" * 1300, "line 1", "16 KiB"),
]


@pytest.fixture(scope="module")
def css_tenant(registry, platform_token, token) -> tuple[str, Any]:
    """An enterprise tenant whose logo is on cdn.acme-towers.example, with SHEET stored."""
    tenant = create_tenant(registry, platform_token, "css", plan="enterprise")
    md = bearer(token(tenant))
    update(registry, md, pb.Branding(logo_url=LOGO, custom_css=SHEET), "branding.logo_url", "branding.custom_css")
    return tenant, md


@pytest.mark.parametrize(("css", "where", "word"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_a_hostile_sheet_is_refused_naming_its_line_and_nothing_is_stored(registry, css_tenant, css, where, word):
    tenant, md = css_tenant
    error = refused(registry, md, pb.Branding(custom_css=css), "branding.custom_css")
    assert (error.code, error.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["settings.branding.custom_css"]), error
    assert error.bad_request is not None
    description = error.bad_request.field_violations[0].description
    assert description.startswith(where) and word in description, description
    settings = registry.GetTenantSettings(pb.GetTenantSettingsRequest(), metadata=md, timeout=10)
    assert settings.branding.custom_css == SHEET
    assert get_branding(registry, tenant).custom_css == SHEET


@pytest.mark.parametrize(
    "css",
    [
        ":root { --brand: #7B2D8E; } /* the brand colour */\nheader h1 { color: var(--brand) !important; }",
        ".logo { background: url('https://cdn.acme-towers.example/brand/bg.png') no-repeat center / cover; }",
        'ul > li + li, a:hover:not(.muted), [data-testid="site-count"] { color: rgb(10 20 30 / 50%) }',
        "body { font: italic bold 14px/1.4 'Segoe UI', Roboto, sans-serif; margin: 0 auto; padding: 1rem }",
    ],
)
def test_a_benign_sheet_is_stored_as_written_and_served_with_the_same_meaning(registry, css_tenant, css):
    tenant, md = css_tenant
    assert update(registry, md, pb.Branding(custom_css=css), "branding.custom_css").branding.custom_css == css
    settings = registry.GetTenantSettings(pb.GetTenantSettingsRequest(), metadata=md, timeout=10)
    assert settings.branding.custom_css == css
    served = get_branding(registry, tenant).custom_css
    assert served and meaning(served) == meaning(css), served
    assert "/*" not in served  # comments are not served


async def test_a_sheet_stored_before_the_rules_is_served_sanitized(registry, new_tenant, admin):
    tenant = new_tenant("cso", plan="enterprise")
    hostile = (
        "h1 { color: red; background: url(https://evil.example/x.png) }\n"
        "@import 'https://evil.example/x.css';\n"
        "p { border: 1px solid #ccc; behavior: url(x.htc) }\n"
        "</style><script>alert(1)</script>"
    )
    # As an older registry wrote it, before anything read the tenant's settings (nothing cached).
    await admin.execute(
        "UPDATE tenant.tenant_settings SET document = jsonb_set(jsonb_set(document, '{settings,branding,customCss}',"
        " to_jsonb($2::text)), '{settings,branding,logoUrl}', to_jsonb($3::text)) WHERE tenant_id = $1",
        tenant,
        hostile,
        LOGO,
    )
    served = get_branding(registry, tenant)
    assert served.logo_url == LOGO  # the row was read, not a cached default
    assert meaning(served.custom_css) == meaning("h1 { color: red }\np { border: 1px solid #ccc }"), served
