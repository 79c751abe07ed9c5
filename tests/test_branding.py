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
from towerco.features.v1 import feature_gate_service_pb2 as features_pb
from towerco.tenant.v1 import tenant_registry_service_pb2 as pb

from .support import bearer, expect_error

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
