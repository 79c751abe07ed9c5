"""Tenant settings without a server: the rules, masks, merging, sealed secrets and masking."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import field_mask_pb2
from towerco.tenant.v1 import tenant_registry_service_pb2 as pb

from services.runtime.errors import ServiceError
from services.runtime.settings import SettingsError
from services.runtime.validation import Violations
from services.tenant import tenant_settings_rules as rules
from services.tenant import tenant_settings_store as store
from services.tenant.secrets import MASK, SecretBox, SecretError, load_secret_box

from .support.settings_changes import Mutate
from .support.settings_changes import set_api_key as _api_key
from .support.settings_changes import set_field as _set

KEY_1, KEY_2 = bytes(range(32)), bytes(range(32, 64))
ALL = rules.MASK_PATHS.top_level
PASSWORD, API_KEY = "smtp-Pa55word-plain", "sk-live-0123456789abcdef"
AAD = "tenant_a/integrations.smtp.password"


def box(active: str = "k1") -> SecretBox:
    return SecretBox({"k1": KEY_1, "k2": KEY_2}, active)


def valid() -> pb.TenantSettings:
    settings = rules.default_settings("tenant_a", "Operator A")
    settings.branding.logo_url = "https://cdn.operator.example/logo.svg"
    settings.branding.custom_css = ".header { background: url(https://cdn.operator.example/bg.png); } /* brand */"
    settings.localization.timezone = "Africa/Nairobi"
    settings.localization.currency = "KES"
    settings.localization.language = "fr-CI"
    settings.business_rules.sla_targets["availability_percent"] = 99.95
    settings.business_rules.alert_thresholds["battery_voltage_min"] = -46.0
    settings.business_rules.escalation_rules.add(level=1, after_minutes=0, notify=["noc@operator.example"])
    settings.business_rules.escalation_rules.add(level=2, after_minutes=30, notify=["user_42", "boss@operator.example"])
    smtp = settings.integrations.smtp
    smtp.host, smtp.port, smtp.username, smtp.password, smtp.tls = "smtp.operator.example", 587, "noc", PASSWORD, True
    settings.integrations.webhook_endpoints.append("https://hooks.operator.example/alerts")
    settings.integrations.api_keys["pagerduty"] = API_KEY
    return settings


def fields(
    settings: pb.TenantSettings, paths: frozenset[str] = ALL, stored: pb.TenantSettings | None = None
) -> list[str]:
    v = Violations()
    rules.validate(settings, paths, v, stored=stored)
    return [item.field for item in v.items]


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def test_valid_settings_and_defaults_have_no_violations() -> None:
    assert fields(valid()) == []
    assert fields(rules.default_settings("tenant_a", "Operator A")) == []


# Update masks


@pytest.mark.parametrize("paths", [(), ("*",)])
def test_empty_mask_or_star_updates_all_four_parts(paths: tuple[str, ...]) -> None:
    assert rules.mask_paths(mask(*paths)) == {"branding", "localization", "business_rules", "integrations"}


def test_mask_accepts_every_field_below_the_parts_from_the_descriptors() -> None:
    updatable = rules.MASK_PATHS.updatable
    for path in ("branding.logo_url", "integrations.smtp", "integrations.smtp.tls", "business_rules.sla_targets"):
        assert path in updatable
    assert "branding.display_name" not in updatable
    assert rules.mask_paths(mask("branding.logo_url", "integrations.smtp.host")) == {
        "branding.logo_url",
        "integrations.smtp.host",
    }


def test_mask_ignores_output_only_paths() -> None:
    assert rules.mask_paths(mask("tenant_id", "branding.display_name", "localization")) == {"localization"}


def test_mask_refuses_each_unknown_path_with_its_own_violation() -> None:
    with pytest.raises(ServiceError) as caught:
        rules.mask_paths(mask("branding", "brandin", "business_rules.sla_targets.uptime", "*"))
    assert caught.value.reason == "INVALID_UPDATE_MASK"
    assert [v.field for v in caught.value.violations] == ["update_mask"] * 3
    assert "'brandin'" in caught.value.violations[0].description


# Validation: one test per rule, each naming the exact field


def _rule(index: int, *, notify: list[str] | None = None, **numbers: int) -> Mutate:
    def mutate(s: pb.TenantSettings) -> None:
        rule = s.business_rules.escalation_rules[index]
        for name, value in numbers.items():
            setattr(rule, name, value)
        if notify is not None:
            del rule.notify[:]
            rule.notify.extend(notify)

    return mutate


def _sla(key: str, value: float) -> Mutate:
    return lambda s: s.business_rules.sla_targets.__setitem__(key, value)


def _smtp(**values: object) -> Mutate:
    def mutate(s: pb.TenantSettings) -> None:
        for name, value in values.items():
            setattr(s.integrations.smtp, name, value)

    return mutate


def _webhook(url: str) -> Mutate:
    return lambda s: s.integrations.webhook_endpoints.__setitem__(0, url)


BAD_VALUES: list[tuple[str, Mutate, str]] = [
    ("company_name_too_long", _set("branding", "company_name", "x" * 101), "settings.branding.company_name"),
    ("company_name_two_lines", _set("branding", "company_name", "A\nB"), "settings.branding.company_name"),
    ("logo_url_http", _set("branding", "logo_url", "http://cdn.example/l.png"), "settings.branding.logo_url"),
    ("logo_url_no_host", _set("branding", "logo_url", "https:///l.png"), "settings.branding.logo_url"),
    (
        "logo_url_too_long",
        _set("branding", "logo_url", "https://a.example/" + "x" * 2031),
        "settings.branding.logo_url",
    ),
    ("primary_color_name", _set("branding", "primary_color", "blue"), "settings.branding.primary_color"),
    ("secondary_color_short", _set("branding", "secondary_color", "#12345"), "settings.branding.secondary_color"),
    ("css_over_16_kib_as_utf8", _set("branding", "custom_css", "é" * 8193), "settings.branding.custom_css"),
    ("timezone_unknown", _set("localization", "timezone", "Mars/Olympus"), "settings.localization.timezone"),
    ("timezone_wrong_case", _set("localization", "timezone", "africa/nairobi"), "settings.localization.timezone"),
    ("timezone_not_iana", _set("localization", "timezone", "localtime"), "settings.localization.timezone"),
    ("date_format_unknown", _set("localization", "date_format", "YYYYMMDD"), "settings.localization.date_format"),
    ("currency_lower_case", _set("localization", "currency", "usd"), "settings.localization.currency"),
    ("currency_unknown", _set("localization", "currency", "XYZ"), "settings.localization.currency"),
    ("language_underscore", _set("localization", "language", "en_US"), "settings.localization.language"),
    ("language_word", _set("localization", "language", "english"), "settings.localization.language"),
    (
        "language_too_long",
        _set("localization", "language", "en-" + "-".join(["abcdefgh"] * 4)),
        "settings.localization.language",
    ),
    ("sla_key_not_snake", _sla("Availability", 99.0), "settings.business_rules.sla_targets[Availability]"),
    ("sla_key_too_long", _sla("a" * 65, 99.0), "settings.business_rules.sla_targets[" + "a" * 64 + "...]"),
    ("sla_nan", _sla("availability_percent", math.nan), "settings.business_rules.sla_targets[availability_percent]"),
    ("sla_inf", _sla("availability_percent", math.inf), "settings.business_rules.sla_targets[availability_percent]"),
    ("sla_negative", _sla("availability_percent", -1), "settings.business_rules.sla_targets[availability_percent]"),
    ("sla_too_big", _sla("availability_percent", 1e6 + 1), "settings.business_rules.sla_targets[availability_percent]"),
    (
        "threshold_too_big",
        lambda s: s.business_rules.alert_thresholds.__setitem__("battery_voltage_min", -2e9),
        "settings.business_rules.alert_thresholds[battery_voltage_min]",
    ),
    ("level_zero", _rule(0, level=0), "settings.business_rules.escalation_rules[0].level"),
    ("level_repeated", _rule(1, level=1), "settings.business_rules.escalation_rules[1].level"),
    ("after_negative", _rule(0, after_minutes=-1), "settings.business_rules.escalation_rules[0].after_minutes"),
    ("after_over_a_week", _rule(1, after_minutes=10081), "settings.business_rules.escalation_rules[1].after_minutes"),
    ("after_not_growing", _rule(1, after_minutes=0), "settings.business_rules.escalation_rules[1].after_minutes"),
    ("notify_empty", _rule(0, notify=[]), "settings.business_rules.escalation_rules[0].notify"),
    (
        "notify_too_many",
        _rule(0, notify=[f"u{i}" for i in range(21)]),
        "settings.business_rules.escalation_rules[0].notify",
    ),
    (
        "notify_bad_entry",
        _rule(1, notify=["ok", "not a user"]),
        "settings.business_rules.escalation_rules[1].notify[1]",
    ),
    ("smtp_host_missing", _smtp(host=""), "settings.integrations.smtp.host"),
    ("smtp_host_not_a_name", _smtp(host="smtp server"), "settings.integrations.smtp.host"),
    ("smtp_host_loopback", _smtp(host="127.0.0.1"), "settings.integrations.smtp.host"),
    ("smtp_host_internal_name", _smtp(host="mail.internal"), "settings.integrations.smtp.host"),
    ("smtp_port_too_big", _smtp(port=65536), "settings.integrations.smtp.port"),
    ("smtp_port_missing", _smtp(port=0), "settings.integrations.smtp.port"),
    ("smtp_username_too_long", _smtp(username="u" * 255), "settings.integrations.smtp.username"),
    ("smtp_password_too_long", _smtp(password="p" * 1025), "settings.integrations.smtp.password"),
    ("webhook_http", _webhook("http://hooks.operator.example/a"), "settings.integrations.webhook_endpoints[0]"),
    (
        "webhook_userinfo",
        _webhook("https://user:pw@hooks.operator.example/"),
        "settings.integrations.webhook_endpoints[0]",
    ),
    (
        "webhook_too_long",
        _webhook("https://hooks.operator.example/" + "x" * 2020),
        "settings.integrations.webhook_endpoints[0]",
    ),
    ("webhook_empty", _webhook(""), "settings.integrations.webhook_endpoints[0]"),
    ("api_key_name_not_snake", _api_key("PagerDuty", "k"), "settings.integrations.api_keys[PagerDuty]"),
    ("api_key_empty", _api_key("pagerduty", ""), "settings.integrations.api_keys[pagerduty]"),
    ("api_key_too_long", _api_key("pagerduty", "k" * 4097), "settings.integrations.api_keys[pagerduty]"),
    ("api_key_line_break", _api_key("pagerduty", "k\r\nX-Evil: 1"), "settings.integrations.api_keys[pagerduty]"),
]


@pytest.mark.parametrize(("mutate", "field"), [case[1:] for case in BAD_VALUES], ids=[case[0] for case in BAD_VALUES])
def test_each_bad_value_is_one_violation_on_its_field(mutate: Mutate, field: str) -> None:
    settings = valid()
    mutate(settings)
    assert fields(settings) == [field]


@pytest.mark.parametrize(
    "css",
    [
        "@import 'x.css';",
        "@IM/**/PORT 'x.css';",
        "a { background: url(https://evil.example/x.png) }",
        "a { background: URL( '//evil.example/x.png' ) }",
        'a { background: url("data:image/png;base64,AAAA") }',
        "a { background: url(' \t/\t/evil.example/x') }",
        'a { background: image-set("https://evil.example/x.png" 1x) }',
        'a { background: -webkit-image-set(url(a.png) 1x, "//evil.example/b.png" 2x) }',
        "a { width: expression(alert(1)) }",
        "a { width: EXPRESSION (alert(1)) }",
        "a { background: url(javascript:alert(1)) }",
        "</style><script>alert(1)</script>",
        "a::after { content: '<b>' }",
        "a { behavior: url(x.htc) }",
        "a { -moz-binding: url(x.xml#x) }",
        "a { background: \\75 rl(https://evil.example) }",
    ],
)
def test_custom_css_refuses_what_can_load_or_run_code(css: str) -> None:
    settings = valid()
    settings.branding.custom_css = css
    assert fields(settings) == ["settings.branding.custom_css"]


def test_custom_css_allows_plain_rules_and_urls_on_the_logo_host() -> None:
    settings = valid()  # its logo is on cdn.operator.example
    settings.branding.custom_css = (
        ":root { --brand: #ff0000; } /* colors */\n"
        ".logo { background: url('https://cdn.operator.example/bg.png') no-repeat; }\n"
        "ul > li { margin: 0; color: var(--brand) }"
    )
    assert fields(settings) == []


def test_custom_css_urls_are_judged_against_the_stored_logo_when_the_update_does_not_set_one() -> None:
    stored = valid()  # logo on cdn.operator.example
    update = pb.TenantSettings(
        branding=pb.Branding(custom_css="h1 { background: url(https://cdn.operator.example/a.png) }")
    )
    other = pb.TenantSettings(branding=pb.Branding(custom_css="h1 { background: url(https://cdn.evil.example/a.png) }"))
    paths = frozenset({"branding.custom_css"})
    # Before the stored settings are read, any https:// url() waits for the check with them.
    assert fields(update, paths) == fields(other, paths) == []
    assert fields(update, paths, stored=stored) == []
    assert fields(other, paths, stored=stored) == ["settings.branding.custom_css"]
    # An update that sets the logo too is judged against its own logo at once.
    both = frozenset({"branding.custom_css", "branding.logo_url"})
    assert fields(update, both) == ["settings.branding.custom_css"]  # the update clears the logo: no url() at all


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "240.0.0.1",
        "2130706433",
        "0x7f.1",
        "0x7f000001",
        "127.1",
        "0177.0.0.1",
        "10.0.0.1.",
        "[::1]",
        "[::]",
        "[::ffff:127.0.0.1]",
        "[::ffff:a00:1]",
        "[::127.0.0.1]",
        "[fe80::1]",
        "[fc00::1]",
        "[ff02::1]",
        "[64:ff9b::a9fe:a9fe]",
        "[2002:7f00:1::]",
        "localhost",
        "localhost.",
        "api.localhost",
        "printer.local",
        "metadata.google.internal",
        "router.home.arpa",
        "intranet",
        "999.1.1.1",
        "hooks.123",
    ],
)
def test_webhook_refuses_internal_and_disguised_hosts(host: str) -> None:
    settings = valid()
    settings.integrations.webhook_endpoints[0] = f"https://{host}/alerts"
    assert fields(settings) == ["settings.integrations.webhook_endpoints[0]"]


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.operator.example/alerts?x=1",
        "HTTPS://Hooks.Operator.Example:8443/a",
        "https://8.8.8.8/alerts",
        "https://[2001:4860:4860::8888]/alerts",
        "https://xn--bcher-kva.example/",
    ],
)
def test_webhook_allows_public_https_urls(url: str) -> None:
    settings = valid()
    settings.integrations.webhook_endpoints[0] = url
    assert fields(settings) == []


@pytest.mark.parametrize(
    "url", ["https://hooks.operator.example\\@10.0.0.1/", "https://exa\tmple.com/", "https://bücher.example/"]
)
def test_webhook_refuses_urls_that_parsers_read_differently(url: str) -> None:
    settings = valid()
    settings.integrations.webhook_endpoints[0] = url
    assert fields(settings) == ["settings.integrations.webhook_endpoints[0]"]


def test_list_and_map_sizes_are_limited_on_the_whole_field() -> None:
    settings = valid()
    for i in range(101):
        settings.business_rules.sla_targets[f"metric_{i}"] = 1.0
    for i in range(20):
        settings.business_rules.escalation_rules.add(level=3 + i, after_minutes=31 + i, notify=["noc"])
    settings.integrations.webhook_endpoints.extend(f"https://h{i}.operator.example/" for i in range(20))
    for i in range(20):
        settings.integrations.api_keys[f"key_{i}"] = "k"
    assert fields(settings) == [
        "settings.business_rules.sla_targets",
        "settings.business_rules.escalation_rules",
        "settings.integrations.webhook_endpoints",
        "settings.integrations.api_keys",
    ]


def test_duplicate_webhooks_are_refused() -> None:
    settings = valid()
    settings.integrations.webhook_endpoints.append(settings.integrations.webhook_endpoints[0])
    assert fields(settings) == ["settings.integrations.webhook_endpoints[1]"]


def test_escalation_must_grow_with_level_not_with_list_order() -> None:
    settings = valid()
    del settings.business_rules.escalation_rules[:]
    settings.business_rules.escalation_rules.add(level=3, after_minutes=60, notify=["noc"])
    settings.business_rules.escalation_rules.add(level=1, after_minutes=5, notify=["noc"])
    settings.business_rules.escalation_rules.add(level=2, after_minutes=90, notify=["noc"])
    assert fields(settings) == ["settings.business_rules.escalation_rules[0].after_minutes"]


def test_every_bad_value_is_reported_at_once() -> None:
    settings = valid()
    settings.branding.primary_color = "red"
    settings.localization.currency = "EURO"
    settings.integrations.webhook_endpoints.append("http://x.example/")
    assert fields(settings) == [
        "settings.branding.primary_color",
        "settings.localization.currency",
        "settings.integrations.webhook_endpoints[1]",
    ]


def test_empty_colors_and_localization_mean_the_defaults() -> None:
    settings = valid()
    settings.branding.primary_color = settings.localization.timezone = settings.localization.currency = ""
    assert fields(settings) == []
    document = store.to_document(settings, box(), "tenant_a", None)
    stored = store.from_document(document, "tenant_a")
    assert (stored.branding.primary_color, stored.localization.timezone, stored.localization.currency) == (
        "#3B82F6",
        "UTC",
        "USD",
    )


# Which paths are validated


def test_only_the_masked_parts_are_validated() -> None:
    settings = valid()
    settings.branding.primary_color = "red"
    settings.localization.currency = "EURO"
    assert fields(settings, frozenset({"localization"})) == ["settings.localization.currency"]
    assert fields(settings, frozenset({"branding.logo_url"})) == []
    assert fields(settings, frozenset({"branding"})) == ["settings.branding.primary_color"]


def test_a_leaf_smtp_update_does_not_need_the_host_when_it_is_stored() -> None:
    update = pb.TenantSettings()
    update.integrations.smtp.port = 2525
    only_port = frozenset({"integrations.smtp.port"})
    assert fields(update, only_port) == []
    assert fields(update, only_port, stored=store.from_document(_document(), "tenant_a")) == []
    no_smtp = rules.default_settings("tenant_a", "Operator A")
    assert fields(update, only_port, stored=no_smtp) == ["settings.integrations.smtp.host"]


def test_an_empty_smtp_message_means_the_platform_server() -> None:
    settings = valid()
    settings.integrations.smtp.CopyFrom(pb.SmtpSettings())
    assert fields(settings) == []
    document = store.to_document(settings, box(), "tenant_a", None)
    assert not store.from_document(document, "tenant_a").integrations.HasField("smtp")


def test_settings_read_back_validate_with_an_empty_mask() -> None:
    # A settings form sends back what it read, masks and all.
    for settings in (valid(), rules.default_settings("tenant_a", "Operator A")):
        document = store.to_document(settings, box(), "tenant_a", None)
        read = store.from_document(document, "tenant_a")
        assert fields(read, ALL, stored=read) == []


# Merging (AIP-134)


def test_a_message_path_replaces_the_message_whole() -> None:
    stored = valid()
    update = pb.TenantSettings(branding=pb.Branding(company_name="New name"))
    merged = rules.merge(stored, update, {"branding"})
    assert merged.branding.company_name == "New name"
    assert merged.branding.logo_url == ""
    assert merged.localization == stored.localization


def test_a_leaf_path_replaces_only_the_leaf_even_when_its_parent_is_absent() -> None:
    stored = valid()
    merged = rules.merge(stored, pb.TenantSettings(), {"branding.logo_url"})
    assert merged.branding.logo_url == ""
    assert merged.branding.company_name == stored.branding.company_name
    update = pb.TenantSettings()
    update.integrations.smtp.port = 2525
    merged = rules.merge(stored, update, {"integrations.smtp.port"})
    assert (merged.integrations.smtp.host, merged.integrations.smtp.port) == ("smtp.operator.example", 2525)


def test_maps_and_lists_are_replaced_whole() -> None:
    stored = valid()
    update = pb.TenantSettings()
    update.business_rules.sla_targets["mttr_minutes"] = 240
    update.integrations.webhook_endpoints.append("https://other.operator.example/")
    merged = rules.merge(stored, update, {"business_rules.sla_targets", "integrations.webhook_endpoints"})
    assert dict(merged.business_rules.sla_targets) == {"mttr_minutes": 240}
    assert list(merged.integrations.webhook_endpoints) == ["https://other.operator.example/"]
    assert merged.business_rules.escalation_rules == stored.business_rules.escalation_rules


def test_merge_keeps_output_only_fields_as_stored() -> None:
    stored = valid()
    stored.branding.display_name = "Operator A"
    update = pb.TenantSettings(tenant_id="tenant_b", branding=pb.Branding(display_name="Forged"))
    merged = rules.merge(stored, update, {"branding"})
    assert (merged.tenant_id, merged.branding.display_name) == ("tenant_a", "Operator A")


# Sealed secrets


def test_sealed_value_opens_only_with_its_tenant_and_field() -> None:
    envelope = box().seal(PASSWORD, AAD)
    assert set(envelope) == {"kid", "nonce", "ct"}
    assert len(base64.b64decode(envelope["nonce"])) == 12
    assert PASSWORD not in json.dumps(envelope)
    assert box().open(envelope, AAD) == PASSWORD
    for other in ("tenant_b/integrations.smtp.password", "tenant_a/integrations.api_keys.pagerduty"):
        with pytest.raises(SecretError):
            box().open(envelope, other)


def test_sealing_twice_gives_different_ciphertexts() -> None:
    assert box().seal(PASSWORD, AAD)["ct"] != box().seal(PASSWORD, AAD)["ct"]


def test_rotation_seals_with_the_active_key_and_opens_with_old_ones() -> None:
    old = SecretBox({"k1": KEY_1}, "k1").seal(PASSWORD, AAD)
    rotated = box(active="k2")
    assert rotated.open(old, AAD) == PASSWORD
    assert rotated.seal(PASSWORD, AAD)["kid"] == "k2"


@pytest.mark.parametrize(
    "tamper",
    [
        lambda e: e.update(kid="k9"),
        lambda e: e.update(ct=base64.b64encode(b"x" * 40).decode()),
        lambda e: e.update(nonce="not base64!"),
        lambda e: e.pop("ct"),
    ],
)
def test_unknown_key_or_altered_envelope_raise_secret_error(tamper: Callable[[dict[str, str]], object]) -> None:
    envelope = box().seal(PASSWORD, AAD)
    tamper(envelope)
    with pytest.raises(SecretError) as caught:
        box().open(envelope, AAD)
    assert PASSWORD not in str(caught.value)


def test_repr_shows_no_key_material() -> None:
    text = repr(box())
    assert "k1" in text
    assert base64.b64encode(KEY_1).decode() not in text
    assert repr(KEY_1) not in text


def _keys_env(*entries: tuple[str, bytes]) -> str:
    return ",".join(f"{kid}={base64.b64encode(key).decode()}" for kid, key in entries)


def test_keys_come_from_the_environment_first_active_unless_named() -> None:
    env = {"SETTINGS_ENCRYPTION_KEYS": _keys_env(("k1", KEY_1), ("k2", KEY_2))}
    assert load_secret_box(env).active_kid == "k1"
    named = load_secret_box({**env, "SETTINGS_ENCRYPTION_KEY_ID": "k2"})
    assert named.active_kid == "k2"
    assert named.open(load_secret_box(env).seal(PASSWORD, AAD), AAD) == PASSWORD


def test_keys_come_from_the_dev_file_when_the_environment_has_none(tmp_path: Path) -> None:
    path = tmp_path / "settings-encryption.keys"
    path.write_text(f"# dev keys\n{_keys_env(('dev-2', KEY_2))}\n\n{_keys_env(('dev-1', KEY_1))}\n")
    loaded = load_secret_box({}, dev_file=path)
    assert loaded.active_kid == "dev-2"
    assert loaded.open(SecretBox({"dev-1": KEY_1}, "dev-1").seal(PASSWORD, AAD), AAD) == PASSWORD


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({}, "SETTINGS_ENCRYPTION_KEYS is not set"),
        ({"SETTINGS_ENCRYPTION_KEYS": "k1"}, "kid=<base64"),
        ({"SETTINGS_ENCRYPTION_KEYS": "k1=!!notbase64"}, "not valid base64"),
        ({"SETTINGS_ENCRYPTION_KEYS": _keys_env(("k1", KEY_1[:16]))}, "32 bytes"),
        ({"SETTINGS_ENCRYPTION_KEYS": _keys_env(("k1", KEY_1), ("k1", KEY_2))}, "twice"),
        ({"SETTINGS_ENCRYPTION_KEYS": _keys_env(("k1", KEY_1)), "SETTINGS_ENCRYPTION_KEY_ID": "k2"}, "k2"),
    ],
)
def test_missing_or_bad_keys_tell_the_operator_what_to_set(tmp_path: Path, env: dict[str, str], says: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_secret_box(env, dev_file=tmp_path / "absent.keys")
    assert says in str(caught.value)
    assert base64.b64encode(KEY_1).decode()[:20] not in str(caught.value)


# Storage and masking


def _document(settings: pb.TenantSettings | None = None) -> dict[str, Any]:
    return store.to_document(settings or valid(), box(), "tenant_a", None)


def test_stored_document_is_json_with_secrets_sealed_for_tenant_and_field() -> None:
    document = _document()
    text = json.dumps(document, allow_nan=False)
    assert PASSWORD not in text
    assert API_KEY not in text
    assert store.reveal_secret(document, box(), "tenant_a", "smtp.password") == PASSWORD
    assert store.reveal_secret(document, box(), "tenant_a", "api_keys.pagerduty") == API_KEY
    assert store.reveal_secret(document, box(), "tenant_a", "api_keys.absent") is None
    with pytest.raises(SecretError):
        store.reveal_secret(document, box(), "tenant_b", "smtp.password")


def test_masked_read_shows_mask_for_stored_secrets_and_never_the_plaintext() -> None:
    read = store.from_document(_document(), "tenant_a")
    assert read.integrations.smtp.password == MASK
    assert dict(read.integrations.api_keys) == {"pagerduty": MASK}
    assert PASSWORD not in str(read)
    assert API_KEY not in str(read)
    expected = valid()
    expected.integrations.smtp.password = MASK
    expected.integrations.api_keys["pagerduty"] = MASK
    assert read == expected


def test_empty_password_means_none_is_stored() -> None:
    settings = valid()
    settings.integrations.smtp.password = ""
    document = _document(settings)
    assert store.from_document(document, "tenant_a").integrations.smtp.password == ""
    assert store.reveal_secret(document, box(), "tenant_a", "smtp.password") is None


def test_mask_keeps_the_stored_secrets_and_a_new_value_replaces_them() -> None:
    previous = _document()
    read = store.from_document(previous, "tenant_a")
    kept = store.to_document(read, box(active="k2"), "tenant_a", previous)
    assert kept["secrets"] == previous["secrets"]
    read.integrations.api_keys["pagerduty"] = "sk-new"
    read.integrations.api_keys["opsgenie"] = "og-key"
    changed = store.to_document(read, box(active="k2"), "tenant_a", previous)
    assert store.reveal_secret(changed, box(), "tenant_a", "api_keys.pagerduty") == "sk-new"
    assert store.reveal_secret(changed, box(), "tenant_a", "smtp.password") == PASSWORD
    assert changed["secrets"]["api_keys.opsgenie"]["kid"] == "k2"


def test_a_removed_api_key_is_no_longer_stored() -> None:
    previous = _document()
    read = store.from_document(previous, "tenant_a")
    del read.integrations.api_keys["pagerduty"]
    assert store.to_document(read, box(), "tenant_a", previous)["secrets"].keys() == {"smtp.password"}


def test_mask_with_nothing_stored_to_keep_is_refused() -> None:
    stored = rules.default_settings("tenant_a", "Operator A")
    update = valid()
    update.integrations.api_keys["pagerduty"] = MASK
    update.integrations.smtp.password = MASK
    assert fields(update, ALL, stored=stored) == [
        "settings.integrations.smtp.password",
        "settings.integrations.api_keys[pagerduty]",
    ]
    with pytest.raises(ServiceError) as caught:
        store.to_document(update, box(), "tenant_a", _document(stored))
    assert [v.field for v in caught.value.violations] == [
        "settings.integrations.smtp.password",
        "settings.integrations.api_keys[pagerduty]",
    ]


def test_no_violation_or_error_ever_quotes_a_secret() -> None:
    settings = valid()
    settings.integrations.smtp.password = PASSWORD * 60
    settings.integrations.api_keys["pagerduty"] = API_KEY + "\n"
    settings.integrations.api_keys["Bad Name"] = API_KEY
    v = Violations()
    rules.validate(settings, ALL, v)
    with pytest.raises(ServiceError) as caught:
        v.raise_if_any()
    text = str(caught.value) + " ".join(f"{item.field} {item.description}" for item in caught.value.violations)
    assert len(caught.value.violations) == 3
    assert PASSWORD not in text
    assert API_KEY not in text


def test_reseal_moves_secrets_to_another_tenant_only() -> None:
    copied = store.reseal(_document(), box(), "tenant_a", "tenant_b")
    assert store.reveal_secret(copied, box(), "tenant_b", "smtp.password") == PASSWORD
    with pytest.raises(SecretError):
        store.reveal_secret(copied, box(), "tenant_a", "smtp.password")


def test_a_ciphertext_copied_to_another_tenant_does_not_open() -> None:
    stolen = _document()
    victim = store.to_document(valid(), box(), "tenant_b", None)
    victim["secrets"]["smtp.password"] = stolen["secrets"]["smtp.password"]
    with pytest.raises(SecretError):
        store.reveal_secret(victim, box(), "tenant_b", "smtp.password")
