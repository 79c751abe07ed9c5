"""Tenant settings through the running registry: masks, every validation rule, sealed secrets.

Each refused update also carries a valid change to another field, and the test reads the
settings back (through the API and in PostgreSQL) to prove that nothing at all was saved.
Secrets are random per test, so finding one in a response, the database document, Redis
or a service log can only mean it leaked.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from towerco.tenant.v1 import tenant_registry_service_pb2 as pb
from towerco.tenant.v1 import tenant_registry_service_pb2_grpc as pb_grpc

from services.tenant import tenant_settings_rules, tenant_settings_store
from services.tenant.secrets import MASK, SecretBox, load_secret_box

from .support import RichError, bearer, expect_error
from .support.metadata import Metadata
from .support.processes import ExtraServices
from .support.settings_changes import Mutate
from .support.settings_changes import set_api_key as _api_key
from .support.settings_changes import set_field as _set

TENANT_LOG = Path(__file__).resolve().parents[1] / "test-output" / "logs" / "tenant.log"


def get_settings(registry: Any, md: Metadata, tenant_id: str = "") -> pb.TenantSettings:
    settings: pb.TenantSettings = registry.GetTenantSettings(
        pb.GetTenantSettingsRequest(tenant_id=tenant_id), metadata=md, timeout=10
    )
    return settings


def update_request(settings: pb.TenantSettings, *paths: str) -> pb.UpdateTenantSettingsRequest:
    request = pb.UpdateTenantSettingsRequest(settings=settings)
    request.update_mask.paths.extend(paths)
    return request


def update(registry: Any, md: Metadata, settings: pb.TenantSettings, *paths: str) -> pb.TenantSettings:
    result: pb.TenantSettings = registry.UpdateTenantSettings(update_request(settings, *paths), metadata=md, timeout=10)
    return result


async def stored_document(admin: Any, tenant_id: str) -> dict[str, Any]:
    raw = await admin.fetchval("SELECT document::text FROM tenant.tenant_settings WHERE tenant_id = $1", tenant_id)
    assert raw is not None, f"no settings row for {tenant_id}"
    document: dict[str, Any] = json.loads(raw)
    return document


@pytest.fixture(scope="session")
def secret_box(stack: Any) -> SecretBox:
    """The registry's own keys (the dev key file of the test stack), to open what it sealed."""
    return load_secret_box({}, stack.keys_dir / "settings-encryption.keys")


# --- reads and masks -------------------------------------------------------------------


def test_new_tenant_reads_its_default_settings(registry, token, tenant_pair):
    tenant, _ = tenant_pair
    settings = get_settings(registry, bearer(token(tenant, role="viewer")))
    expected = tenant_settings_rules.default_settings(tenant, tenant)  # the fixture names the tenant after its id
    assert settings == expected
    assert settings.branding.primary_color == "#3B82F6"
    assert settings.localization.timezone == "UTC"
    assert not settings.integrations.HasField("smtp")


def test_update_of_a_leaf_path_changes_only_that_field(registry, token, tenant_pair):
    tenant, _ = tenant_pair
    md = bearer(token(tenant))
    before = get_settings(registry, md)
    change = pb.TenantSettings(
        branding=pb.Branding(primary_color="#0A0B0C", company_name="ignored: not in the mask"),
        localization=pb.Localization(currency="KES"),
    )
    after = update(registry, md, change, "branding.primary_color")

    expected = pb.TenantSettings()
    expected.CopyFrom(before)
    expected.branding.primary_color = "#0A0B0C"
    assert after == expected
    assert get_settings(registry, md) == expected


def test_update_of_a_message_path_replaces_that_message_whole(registry, token, tenant_pair):
    tenant, _ = tenant_pair
    md = bearer(token(tenant))
    update(
        registry,
        md,
        pb.TenantSettings(
            localization=pb.Localization(timezone="Africa/Nairobi", currency="KES", language="sw-KE"),
            branding=pb.Branding(company_name="Savanna"),
        ),
        "localization",
        "branding.company_name",
    )
    after = update(
        registry, md, pb.TenantSettings(localization=pb.Localization(timezone="Africa/Lagos")), "localization"
    )
    # Fields left empty in the new message fall back to their defaults; branding is untouched.
    assert after.localization == pb.Localization(
        timezone="Africa/Lagos", date_format="YYYY-MM-DD", currency="USD", language="en"
    )
    assert after.branding.company_name == "Savanna"
    assert get_settings(registry, md) == after


def test_empty_mask_updates_all_four_parts(registry, token, tenant_pair):
    tenant, _ = tenant_pair
    md = bearer(token(tenant))
    full = pb.TenantSettings(
        branding=pb.Branding(company_name="Full", logo_url="https://cdn.operator.example/logo.svg"),
        localization=pb.Localization(timezone="Europe/Paris", date_format="DD/MM/YYYY", currency="EUR", language="fr"),
        business_rules=pb.BusinessRules(
            sla_targets={"availability_percent": 99.9},
            alert_thresholds={"battery_voltage_min": 46.0},
            escalation_rules=[pb.EscalationRule(level=1, after_minutes=5, notify=["noc@operator.example"])],
        ),
        integrations=pb.Integrations(webhook_endpoints=["https://hooks.operator.example/a"]),
    )
    after = update(registry, md, full)
    assert after.branding.company_name == "Full"
    assert after.localization.date_format == "DD/MM/YYYY"
    assert dict(after.business_rules.sla_targets) == {"availability_percent": 99.9}
    assert list(after.integrations.webhook_endpoints) == ["https://hooks.operator.example/a"]
    assert get_settings(registry, md) == after


@pytest.mark.parametrize("paths", [["brandin"], ["branding.colour"], ["tenant_id", "business_rules.sla_targets.x"]])
def test_unknown_mask_paths_are_invalid_argument(registry, token, tenant_pair, paths):
    tenant, _ = tenant_pair
    md = bearer(token(tenant))
    before = get_settings(registry, md)
    error = expect_error(
        registry.UpdateTenantSettings,
        update_request(pb.TenantSettings(branding=pb.Branding(company_name="Nope")), *paths),
        metadata=md,
    )
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_UPDATE_MASK"), error
    assert set(error.fields) == {"update_mask"}
    assert get_settings(registry, md) == before


def test_a_viewer_cannot_update_settings(registry, token, tenant_pair):
    tenant, _ = tenant_pair
    error = expect_error(
        registry.UpdateTenantSettings,
        update_request(pb.TenantSettings(branding=pb.Branding(company_name="Nope")), "branding.company_name"),
        metadata=bearer(token(tenant, role="viewer")),
    )
    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_MISSING"), error


# --- one bad value per rule: refused by name, nothing saved -----------------------------


def _map(name: str, key: str, value: float) -> Mutate:
    return lambda s: getattr(s.business_rules, name).__setitem__(key, value)


def _rules(*rules: pb.EscalationRule) -> Mutate:
    return lambda s: s.business_rules.escalation_rules.extend(rules)


def _smtp(**values: Any) -> Mutate:
    def mutate(s: pb.TenantSettings) -> None:
        s.integrations.smtp.CopyFrom(pb.SmtpSettings(**{"host": "smtp.operator.example", "port": 587, **values}))

    return mutate


def _webhooks(*urls: str) -> Mutate:
    return lambda s: s.integrations.webhook_endpoints.extend(urls)


def _rule(level: int, after: int, *notify: str) -> pb.EscalationRule:
    return pb.EscalationRule(level=level, after_minutes=after, notify=list(notify))


BR, LOC, BIZ, INT = "settings.branding", "settings.localization", "settings.business_rules", "settings.integrations"
# (id, mask path, bad value, the one field violation expected)
BAD_VALUES: list[tuple[str, str, Mutate, str]] = [
    (
        "company_name_too_long",
        "branding.company_name",
        _set("branding", "company_name", "x" * 101),
        f"{BR}.company_name",
    ),
    (
        "logo_url_not_https",
        "branding.logo_url",
        _set("branding", "logo_url", "http://cdn.example/l.png"),
        f"{BR}.logo_url",
    ),
    ("logo_url_javascript", "branding", _set("branding", "logo_url", "javascript:alert(1)"), f"{BR}.logo_url"),
    ("primary_color_name", "branding.primary_color", _set("branding", "primary_color", "blue"), f"{BR}.primary_color"),
    ("secondary_color_short", "branding", _set("branding", "secondary_color", "#12345"), f"{BR}.secondary_color"),
    ("css_too_big", "branding.custom_css", _set("branding", "custom_css", "a{}" + " " * 16384), f"{BR}.custom_css"),
    ("css_import", "branding.custom_css", _set("branding", "custom_css", "@import 'x.css';"), f"{BR}.custom_css"),
    (
        "css_url_other_origin",
        "branding.custom_css",
        _set("branding", "custom_css", ".h{background:url(https://evil.example/x.png)}"),
        f"{BR}.custom_css",
    ),
    (
        "css_url_protocol_relative",
        "branding.custom_css",
        _set("branding", "custom_css", ".h{background:url('//evil.example/x.png')}"),
        f"{BR}.custom_css",
    ),
    (
        "css_expression",
        "branding.custom_css",
        _set("branding", "custom_css", ".h{width:expression(alert(1))}"),
        f"{BR}.custom_css",
    ),
    (
        "css_javascript",
        "branding.custom_css",
        _set("branding", "custom_css", ".h{background:url(javascript:alert(1))}"),
        f"{BR}.custom_css",
    ),
    ("css_end_style", "branding.custom_css", _set("branding", "custom_css", "</style><b>"), f"{BR}.custom_css"),
    (
        "css_angle_bracket",
        "branding.custom_css",
        _set("branding", "custom_css", ".h::after{content:'<'}"),
        f"{BR}.custom_css",
    ),
    ("timezone_unknown", "localization.timezone", _set("localization", "timezone", "Mars/Olympus"), f"{LOC}.timezone"),
    ("date_format_unknown", "localization", _set("localization", "date_format", "YYYYMMDD"), f"{LOC}.date_format"),
    ("currency_lower_case", "localization.currency", _set("localization", "currency", "kes"), f"{LOC}.currency"),
    ("currency_unknown", "localization.currency", _set("localization", "currency", "XYZ"), f"{LOC}.currency"),
    ("language_not_bcp47", "localization.language", _set("localization", "language", "en_US"), f"{LOC}.language"),
    (
        "sla_infinite",
        "business_rules.sla_targets",
        _map("sla_targets", "availability_percent", math.inf),
        f"{BIZ}.sla_targets[availability_percent]",
    ),
    (
        "sla_nan",
        "business_rules",
        _map("sla_targets", "availability_percent", math.nan),
        f"{BIZ}.sla_targets[availability_percent]",
    ),
    (
        "sla_out_of_bounds",
        "business_rules.sla_targets",
        _map("sla_targets", "availability_percent", 1e7),
        f"{BIZ}.sla_targets[availability_percent]",
    ),
    (
        "sla_key_not_snake",
        "business_rules.sla_targets",
        _map("sla_targets", "Uptime", 99.0),
        f"{BIZ}.sla_targets[Uptime]",
    ),
    (
        "threshold_out_of_bounds",
        "business_rules.alert_thresholds",
        _map("alert_thresholds", "battery_voltage_min", -2e9),
        f"{BIZ}.alert_thresholds[battery_voltage_min]",
    ),
    (
        "threshold_infinite",
        "business_rules.alert_thresholds",
        _map("alert_thresholds", "battery_voltage_min", -math.inf),
        f"{BIZ}.alert_thresholds[battery_voltage_min]",
    ),
    (
        "escalation_level_zero",
        "business_rules.escalation_rules",
        _rules(_rule(0, 5, "noc")),
        f"{BIZ}.escalation_rules[0].level",
    ),
    (
        "escalation_level_repeated",
        "business_rules.escalation_rules",
        _rules(_rule(1, 5, "noc"), _rule(1, 10, "boss")),
        f"{BIZ}.escalation_rules[1].level",
    ),
    (
        "escalation_after_negative",
        "business_rules.escalation_rules",
        _rules(_rule(1, -1, "noc")),
        f"{BIZ}.escalation_rules[0].after_minutes",
    ),
    (
        "escalation_after_not_growing",
        "business_rules.escalation_rules",
        _rules(_rule(1, 30, "noc"), _rule(2, 10, "boss")),
        f"{BIZ}.escalation_rules[1].after_minutes",
    ),
    (
        "escalation_notify_empty",
        "business_rules.escalation_rules",
        _rules(_rule(1, 5)),
        f"{BIZ}.escalation_rules[0].notify",
    ),
    (
        "escalation_notify_bad",
        "business_rules.escalation_rules",
        _rules(_rule(1, 5, "noc", "two words")),
        f"{BIZ}.escalation_rules[0].notify[1]",
    ),
    ("smtp_port_too_big", "integrations.smtp", _smtp(port=70000), f"{INT}.smtp.port"),
    ("smtp_host_missing", "integrations.smtp", _smtp(host=""), f"{INT}.smtp.host"),
    ("smtp_host_loopback", "integrations.smtp", _smtp(host="127.0.0.1"), f"{INT}.smtp.host"),
    ("smtp_host_localhost", "integrations", _smtp(host="localhost"), f"{INT}.smtp.host"),
    (
        "webhook_http",
        "integrations.webhook_endpoints",
        _webhooks("http://hooks.example.com/a"),
        f"{INT}.webhook_endpoints[0]",
    ),
    (
        "webhook_loopback",
        "integrations.webhook_endpoints",
        _webhooks("https://hooks.operator.example/a", "https://127.0.0.1/hook"),
        f"{INT}.webhook_endpoints[1]",
    ),
    (
        "webhook_loopback_v6",
        "integrations.webhook_endpoints",
        _webhooks("https://[::1]/hook"),
        f"{INT}.webhook_endpoints[0]",
    ),
    (
        "webhook_localhost",
        "integrations.webhook_endpoints",
        _webhooks("https://localhost/hook"),
        f"{INT}.webhook_endpoints[0]",
    ),
    (
        "webhook_private",
        "integrations.webhook_endpoints",
        _webhooks("https://10.1.2.3/hook"),
        f"{INT}.webhook_endpoints[0]",
    ),
    ("webhook_private_172", "integrations", _webhooks("https://172.16.5.4/hook"), f"{INT}.webhook_endpoints[0]"),
    (
        "webhook_link_local",
        "integrations.webhook_endpoints",
        _webhooks("https://169.254.169.254/latest/meta-data"),
        f"{INT}.webhook_endpoints[0]",
    ),
    (
        "webhook_decimal_loopback",
        "integrations.webhook_endpoints",
        _webhooks("https://2130706433/"),
        f"{INT}.webhook_endpoints[0]",
    ),
    ("api_key_name", "integrations.api_keys", _api_key("Pager Duty", "sk-1"), f"{INT}.api_keys[Pager Duty]"),
    ("api_key_empty", "integrations.api_keys", _api_key("pagerduty", ""), f"{INT}.api_keys[pagerduty]"),
]


@pytest.mark.parametrize(("path", "mutate", "field"), [c[1:] for c in BAD_VALUES], ids=[c[0] for c in BAD_VALUES])
async def test_a_bad_value_is_refused_by_field_and_nothing_is_saved(
    registry, token, tenant_pair, admin, path, mutate, field
):
    tenant, _ = tenant_pair
    md = bearer(token(tenant))
    before = get_settings(registry, md)
    document_before = await stored_document(admin, tenant)

    request = pb.TenantSettings(
        branding=pb.Branding(company_name="Must Not Stick"), localization=pb.Localization(currency="KES")
    )
    mutate(request)
    # A valid change to another part rides along: an invalid update must change nothing.
    other = "localization.currency" if path.startswith("branding") else "branding.company_name"
    error = expect_error(registry.UpdateTenantSettings, update_request(request, path, other), metadata=md)

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.fields == [field], error
    assert error.info is not None and error.info.domain == "towerco.tenant.v1.TenantRegistryService"
    assert get_settings(registry, md) == before
    assert await stored_document(admin, tenant) == document_before


def test_every_bad_value_of_one_update_is_its_own_violation(registry, token, tenant_pair):
    tenant, _ = tenant_pair
    md = bearer(token(tenant))
    request = pb.TenantSettings(
        branding=pb.Branding(primary_color="red", logo_url="http://x.example/l.png"),
        localization=pb.Localization(timezone="Nowhere/City", currency="usd"),
    )
    error = expect_error(
        registry.UpdateTenantSettings, update_request(request, "branding", "localization"), metadata=md
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert sorted(error.fields) == sorted(
        [
            "settings.branding.primary_color",
            "settings.branding.logo_url",
            "settings.localization.timezone",
            "settings.localization.currency",
        ]
    )


# --- secrets ---------------------------------------------------------------------------


def all_text(*messages: Any) -> bytes:
    """Everything a client could see of some messages: their wire bytes and text form."""
    return b"".join(m.SerializeToString() + str(m).encode() for m in messages)


def error_text(error: RichError) -> bytes:
    parts = [error.message.encode()]
    for detail in (error.info, error.bad_request):
        if detail is not None:
            parts.append(detail.SerializeToString() + str(detail).encode())
    return b"".join(parts)


def smtp(password: str, username: str = "noc", port: int = 587) -> pb.SmtpSettings:
    return pb.SmtpSettings(host="smtp.operator.example", port=port, username=username, password=password, tls=True)


async def audit_trail(admin: Any, tenant_id: str) -> bytes:
    """Every audit event of ``tenant_id`` the registry recorded, wherever it is now.

    The relay deletes an event from the outbox only after the audit service stored it, so
    each event is in one of the two places (or both) at any moment.
    """
    outbox = await admin.fetch("SELECT event FROM tenant.audit_outbox WHERE tenant_id = $1", tenant_id)
    found = [bytes(row["event"]) for row in outbox]
    if await admin.fetchval("SELECT to_regclass('audit.events') IS NOT NULL"):
        logged = await admin.fetch(
            "SELECT to_jsonb(e)::text AS event FROM audit.events e WHERE tenant_id = $1", tenant_id
        )
        found.extend(row["event"].encode() for row in logged)
    return b"\n".join(found)


@dataclass(frozen=True)
class SecretsSent:
    """Secrets written to one tenant's settings through two registry processes (the second
    logs at DEBUG), two of them refused, and every reply and error a client saw meanwhile."""

    tenant: str
    password: str
    api_key: str
    second_key: str
    secrets: tuple[str, ...]  # every secret sent, the refused one too
    written: pb.TenantSettings
    via_second: pb.TenantSettings
    errors: list[RichError]
    read: pb.TenantSettings
    seen: bytes  # everything a client saw: replies, the branding, the errors
    logs: Callable[[], str]  # both registry processes' log output


@pytest.fixture(scope="module")
def secrets_sent(registry, token, stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecretsSent]:
    """Done once for the tests of where secrets go (each looks in one place)."""
    tenant = f"ta_{uuid.uuid4().hex[:10]}"
    md = bearer(token(tenant))
    password, api_key = f"pw-{uuid.uuid4().hex}", f"sk-live-{uuid.uuid4().hex}"
    second_key, rejected = f"sk-second-{uuid.uuid4().hex}", f"sk-bad-{uuid.uuid4().hex}"
    services = ExtraServices(stack, tmp_path_factory.mktemp("secrets"))
    try:
        extra = services.start("tenant", {"LOG_LEVEL": "DEBUG"})
        written = update(
            registry,
            md,
            pb.TenantSettings(integrations=pb.Integrations(smtp=smtp(password), api_keys={"pagerduty": api_key})),
            "integrations",
        )
        with grpc.insecure_channel(extra.target) as channel:
            second = pb_grpc.TenantRegistryServiceStub(channel)
            also = pb.TenantSettings(integrations=pb.Integrations(api_keys={"pagerduty": MASK, "opsgenie": second_key}))
            via_second = second.UpdateTenantSettings(
                update_request(also, "integrations.api_keys"), metadata=md, timeout=10
            )
            read_second = second.GetTenantSettings(pb.GetTenantSettingsRequest(), metadata=md, timeout=10)
            # A refused secret is not echoed in the error either.
            bad = pb.TenantSettings(integrations=pb.Integrations(api_keys={"pagerduty": rejected + "\n"}))
            errors = [
                expect_error(second.UpdateTenantSettings, update_request(bad, "integrations.api_keys"), metadata=md),
                expect_error(
                    registry.UpdateTenantSettings,
                    update_request(
                        pb.TenantSettings(integrations=pb.Integrations(smtp=smtp(rejected + "x" * 1024))),
                        "integrations.smtp",
                    ),
                    metadata=md,
                ),
            ]
        read = get_settings(registry, md)
        branding = registry.GetBranding(pb.GetBrandingRequest(tenant_id=tenant), timeout=10)
        seen = all_text(written, via_second, read_second, read, branding) + b"".join(error_text(e) for e in errors)
        yield SecretsSent(
            tenant,
            password,
            api_key,
            second_key,
            (password, api_key, second_key, rejected),
            written,
            via_second,
            errors,
            read,
            seen,
            lambda: TENANT_LOG.read_text(errors="replace") + extra.output(),
        )
    finally:
        services.stop()


def test_written_secrets_come_back_masked(secrets_sent):
    written = secrets_sent.written
    assert written.integrations.smtp.password == MASK
    assert dict(written.integrations.api_keys) == {"pagerduty": MASK}
    assert written.integrations.smtp.host == "smtp.operator.example"


def test_a_secret_added_through_another_process_beside_a_sent_back_mask_comes_back_masked(secrets_sent):
    assert dict(secrets_sent.via_second.integrations.api_keys) == {"pagerduty": MASK, "opsgenie": MASK}


def test_a_refused_secret_is_invalid_argument_naming_its_field(secrets_sent):
    errors = secrets_sent.errors
    assert [e.code for e in errors] == [grpc.StatusCode.INVALID_ARGUMENT] * 2
    assert errors[0].fields == ["settings.integrations.api_keys[pagerduty]"]
    assert errors[1].fields == ["settings.integrations.smtp.password"]


def test_read_settings_carry_the_mask_for_every_secret(secrets_sent):
    read = secrets_sent.read
    assert read.integrations.smtp.password == MASK
    assert dict(read.integrations.api_keys) == {"pagerduty": MASK, "opsgenie": MASK}


def test_no_reply_branding_or_error_holds_a_secret(secrets_sent):
    for secret in secrets_sent.secrets:
        assert secret.encode() not in secrets_sent.seen


async def test_the_stored_settings_row_holds_no_secret_in_plaintext(admin, secrets_sent):
    raw = await admin.fetchval(
        "SELECT document::text FROM tenant.tenant_settings WHERE tenant_id = $1", secrets_sent.tenant
    )
    for secret in secrets_sent.secrets:
        assert secret not in raw


async def test_each_stored_secret_is_sealed_for_its_tenant_and_field_with_the_active_key(
    admin, secret_box, secrets_sent
):
    # At rest: sealed, each bound to this tenant and field.
    tenant = secrets_sent.tenant
    document = await stored_document(admin, tenant)
    assert set(document["secrets"]) == {"smtp.password", "api_keys.pagerduty", "api_keys.opsgenie"}
    assert document["secrets"]["smtp.password"]["kid"] == secret_box.active_kid
    reveal = tenant_settings_store.reveal_secret
    assert reveal(document, secret_box, tenant, "smtp.password") == secrets_sent.password
    assert reveal(document, secret_box, tenant, "api_keys.pagerduty") == secrets_sent.api_key
    assert reveal(document, secret_box, tenant, "api_keys.opsgenie") == secrets_sent.second_key


def test_the_shared_cache_holds_the_settings_with_the_mask_only(stack, secrets_sent):
    client = redis.Redis.from_url(stack.redis_url)
    try:
        cached = client.get(f"tenant:{{{secrets_sent.tenant}}}:settings")
    finally:
        client.close()
    assert cached is not None and MASK.encode() in cached
    for secret in secrets_sent.secrets:
        assert secret.encode() not in cached


async def test_the_audit_trail_of_the_updates_holds_no_secret(admin, secrets_sent):
    # Events still in the registry's outbox, or already in the audit log.
    audited = await audit_trail(admin, secrets_sent.tenant)
    assert b"settings.update" in audited, "the settings updates were audited"
    for secret in secrets_sent.secrets:
        assert secret.encode() not in audited


def test_no_log_line_of_either_registry_process_holds_a_secret(secrets_sent):
    logs = secrets_sent.logs()
    assert secrets_sent.tenant in logs  # the logs do record what happened to this tenant
    for secret in secrets_sent.secrets:
        assert secret not in logs


async def test_sending_the_mask_back_keeps_the_stored_secrets(registry, token, tenant_pair, admin, secret_box):
    tenant, _ = tenant_pair
    md = bearer(token(tenant))
    password, api_key = f"pw-{uuid.uuid4().hex}", f"sk-{uuid.uuid4().hex}"
    update(
        registry,
        md,
        pb.TenantSettings(integrations=pb.Integrations(smtp=smtp(password), api_keys={"pagerduty": api_key})),
        "integrations",
    )
    sealed = (await stored_document(admin, tenant))["secrets"]

    # A settings form sends back what it read, with one field changed.
    form = get_settings(registry, md)
    assert form.integrations.smtp.password == MASK
    form.integrations.smtp.username = "noc-2"
    form.integrations.api_keys["statuspage"] = "sk-status-new"
    after = update(registry, md, form, "integrations")
    assert after.integrations.smtp.username == "noc-2"
    assert dict(after.integrations.api_keys) == {"pagerduty": MASK, "statuspage": MASK}

    document = await stored_document(admin, tenant)
    assert document["secrets"]["smtp.password"] == sealed["smtp.password"]  # the very same envelope
    assert document["secrets"]["api_keys.pagerduty"] == sealed["api_keys.pagerduty"]
    assert tenant_settings_store.reveal_secret(document, secret_box, tenant, "smtp.password") == password
    assert tenant_settings_store.reveal_secret(document, secret_box, tenant, "api_keys.statuspage") == "sk-status-new"

    # The mask on a leaf path keeps the password too; a new value replaces it.
    update(registry, md, pb.TenantSettings(integrations=pb.Integrations(smtp=smtp(MASK))), "integrations.smtp.password")
    assert (await stored_document(admin, tenant))["secrets"]["smtp.password"] == sealed["smtp.password"]
    update(
        registry, md, pb.TenantSettings(integrations=pb.Integrations(smtp=smtp("new-pw"))), "integrations.smtp.password"
    )
    document = await stored_document(admin, tenant)
    assert document["secrets"]["smtp.password"] != sealed["smtp.password"]
    assert tenant_settings_store.reveal_secret(document, secret_box, tenant, "smtp.password") == "new-pw"


async def test_the_mask_where_nothing_is_stored_is_refused(registry, token, tenant_pair, admin):
    tenant, _ = tenant_pair
    md = bearer(token(tenant))
    document_before = await stored_document(admin, tenant)
    for settings, path, field in (
        (pb.TenantSettings(integrations=pb.Integrations(smtp=smtp(MASK))), "integrations.smtp", "smtp.password"),
        (
            pb.TenantSettings(integrations=pb.Integrations(api_keys={"pagerduty": MASK})),
            "integrations.api_keys",
            "api_keys[pagerduty]",
        ),
    ):
        error = expect_error(registry.UpdateTenantSettings, update_request(settings, path), metadata=md)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
        assert error.fields == [f"settings.integrations.{field}"], error
    assert await stored_document(admin, tenant) == document_before
