"""Field behaviour in the protos, without a server: update masks read it, and it is declared.

The sets below are the documented API surface of UpdateSite and UpdateTenantSettings, as
they were written by hand before the protos declared them; the stack tests
(test_sites_api, test_tenant_settings_api) prove what naming each kind of path does.
"""

from __future__ import annotations

import pytest
from google.api import field_behavior_pb2
from google.protobuf import field_mask_pb2
from google.protobuf.descriptor import Descriptor, FileDescriptor
from towerco.audit.v1 import audit_log_service_pb2
from towerco.features.v1 import feature_gate_service_pb2
from towerco.internal.v1 import entitlements_pb2, tenant_data_pb2
from towerco.sites.v1 import sites_service_pb2
from towerco.tenant.v1 import tenant_registry_service_pb2

from services.runtime.errors import ServiceError
from services.runtime.field_behavior import behaviors, walk
from services.sites import convert as site_rules
from services.sites import servicer as sites_servicer
from services.sites.servicer import _mask_paths as site_mask_paths
from services.tenant import servicer as tenant_servicer
from services.tenant import tenant_settings_rules

FILES: tuple[FileDescriptor, ...] = (
    sites_service_pb2.DESCRIPTOR,
    tenant_registry_service_pb2.DESCRIPTOR,
    feature_gate_service_pb2.DESCRIPTOR,
    audit_log_service_pb2.DESCRIPTOR,
    entitlements_pb2.DESCRIPTOR,
    tenant_data_pb2.DESCRIPTOR,
)
FIELD_MASK = field_mask_pb2.FieldMask.DESCRIPTOR.full_name


def updated_resources() -> dict[str, Descriptor]:
    """Every message an update takes with an ``update_mask``, by request name."""
    found: dict[str, Descriptor] = {}
    for file in FILES:
        for request in file.message_types_by_name.values():
            mask = request.fields_by_name.get("update_mask")
            if mask is None or mask.message_type is None or mask.message_type.full_name != FIELD_MASK:
                continue
            (resource,) = [f.message_type for f in request.fields if f.message_type is not None and f is not mask]
            found[request.full_name] = resource
    return found


def test_update_masks_are_found_for_every_update_method() -> None:
    assert set(updated_resources()) == {
        "towerco.sites.v1.UpdateSiteRequest",
        "towerco.tenant.v1.UpdateTenantSettingsRequest",
    }


@pytest.mark.parametrize("request_name", sorted(updated_resources()))
def test_every_field_an_update_mask_reaches_declares_its_behaviour(request_name: str) -> None:
    resource = updated_resources()[request_name]
    undeclared = [path for path, field in walk(resource) if not behaviors(field)]
    assert undeclared == [], f"fields of {resource.full_name} without (google.api.field_behavior): {undeclared}"


def test_site_mask_paths_are_the_documented_ones() -> None:
    assert site_rules.MASK_PATHS.updatable == {
        "name",
        "location",
        "location.latitude",
        "location.longitude",
        "location.address",
        "location.region",
        "location.country_code",
        "configuration",
    }
    assert site_rules.MASK_PATHS.fixed == {"site_id", "tenant_id", "create_time", "update_time"}
    assert site_rules.MASK_PATHS.top_level == {"name", "location", "configuration"}


def test_settings_mask_paths_are_the_documented_ones() -> None:
    paths = tenant_settings_rules.MASK_PATHS
    assert paths.top_level == {"branding", "localization", "business_rules", "integrations"}
    assert paths.fixed == {"tenant_id", "branding.display_name"}
    # Maps and repeated fields are replaced whole: nothing below them can be named.
    assert paths.updatable == {
        "branding",
        "branding.company_name",
        "branding.logo_url",
        "branding.primary_color",
        "branding.secondary_color",
        "branding.custom_css",
        "localization",
        "localization.timezone",
        "localization.date_format",
        "localization.currency",
        "localization.language",
        "business_rules",
        "business_rules.sla_targets",
        "business_rules.alert_thresholds",
        "business_rules.escalation_rules",
        "integrations",
        "integrations.smtp",
        "integrations.smtp.host",
        "integrations.smtp.port",
        "integrations.smtp.username",
        "integrations.smtp.password",
        "integrations.smtp.tls",
        "integrations.webhook_endpoints",
        "integrations.api_keys",
    }


@pytest.mark.parametrize("path", ["site_id", "tenant_id", "create_time", "update_time"])
def test_site_update_refuses_a_fixed_path_as_not_updatable(path: str) -> None:
    request = sites_service_pb2.UpdateSiteRequest(update_mask=field_mask_pb2.FieldMask(paths=["name", path]))
    with pytest.raises(ServiceError) as caught:
        site_mask_paths(request)
    assert caught.value.reason == "INVALID_UPDATE_MASK"
    [violation] = caught.value.violations
    assert violation.description == f"{path!r} is output only or immutable and cannot be updated"


@pytest.mark.parametrize("mask", [[], ["*"]])
def test_site_update_without_a_mask_updates_the_top_level_fields(mask: list[str]) -> None:
    request = sites_service_pb2.UpdateSiteRequest(update_mask=field_mask_pb2.FieldMask(paths=mask))
    assert site_mask_paths(request) == {"name", "location", "configuration"}


def test_settings_unknown_path_names_the_four_parts_in_proto_order() -> None:
    with pytest.raises(ServiceError) as caught:
        tenant_settings_rules.mask_paths(field_mask_pb2.FieldMask(paths=["brandin"]))
    [violation] = caught.value.violations
    assert violation.description == (
        "'brandin' is not a settings field that can be updated; name branding, localization, "
        "business_rules, integrations or a field below them such as branding.logo_url"
    )


def test_settings_defaults_are_the_fields_declared_non_empty_default() -> None:
    declared = {
        path
        for path, field in walk(tenant_registry_service_pb2.TenantSettings.DESCRIPTOR)
        if field_behavior_pb2.NON_EMPTY_DEFAULT in behaviors(field)
    }
    assert declared == set(tenant_settings_rules.DEFAULTS)


def test_creates_ignore_the_output_only_and_identifier_fields_of_the_resource() -> None:
    assert set(sites_servicer.CREATE_IGNORES) == {
        "site.site_id",
        "site.tenant_id",
        "site.create_time",
        "site.update_time",
    }
    assert set(tenant_servicer.CREATE_IGNORES) == {
        "tenant.tenant_id",
        "tenant.state",
        "tenant.suspend_reason",
        "tenant.legal_hold",
        "tenant.legal_hold_reason",
        "tenant.cell",
        "tenant.create_time",
        "tenant.update_time",
    }
