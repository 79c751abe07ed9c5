"""TenantSettings: defaults, update masks, validation, storage with sealed secrets, masking.

Every rule reports its own field violation, named by its path in the request
(``settings.branding.primary_color``, ``settings.integrations.webhook_endpoints[0]``), so
a settings form can mark each bad field. No plaintext secret ever enters an error, a
log line, a cache or a response.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import re
import zoneinfo
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any
from urllib.parse import urlsplit

from google.protobuf import field_mask_pb2, json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from towerco.tenant.v1 import tenant_registry_service_pb2 as pb

from services.runtime.errors import FieldViolation, invalid_argument
from services.runtime.validation import Violations

from .secrets import MASK, SecretBox

TOP_LEVEL = ("branding", "localization", "business_rules", "integrations")
IGNORED_PATHS = frozenset({"tenant_id", "branding.display_name"})
DEFAULT_PRIMARY, DEFAULT_SECONDARY = "#3B82F6", "#6B7280"

#: Date formats the UI knows how to render.
DATE_FORMATS = frozenset(
    {"YYYY-MM-DD", "DD/MM/YYYY", "MM/DD/YYYY", "DD.MM.YYYY", "DD-MM-YYYY", "YYYY/MM/DD", "DD MMM YYYY"}
)
#: ISO 4217 active currency codes.
CURRENCIES = frozenset(
    """AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN BWP BYN BZD CAD
    CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD
    HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL
    LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR
    PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP
    TRY TTD TWD TZS UAH UGX USD UYU UZS VED VES VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG""".split()
)
LANGUAGE = re.compile(
    r"^[a-zA-Z]{2,3}(-[a-zA-Z]{4})?(-([a-zA-Z]{2}|[0-9]{3}))?(-([a-zA-Z0-9]{5,8}|[0-9][a-zA-Z0-9]{3}))*$"
)
COLOR = re.compile(r"^#[0-9A-Fa-f]{6}$")
METRIC_KEY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
RECIPIENT = re.compile(r"^[A-Za-z0-9._@+-]{1,254}$")
HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
MAX_CSS_BYTES = 16 * 1024
MAX_MAP_ENTRIES, MAX_RULES, MAX_RECIPIENTS, MAX_WEBHOOKS, MAX_API_KEYS = 100, 20, 20, 20, 20
SLA_RANGE, THRESHOLD_RANGE = (0.0, 1e6), (-1e9, 1e9)
MAX_AFTER_MINUTES = 7 * 24 * 60

_CSS_COMMENT = re.compile(r"/\*.*?(\*/|$)", re.DOTALL)
_CSS_URL = re.compile(r"url\(\s*(['\"]?)(.*?)\1\s*\)", re.IGNORECASE | re.DOTALL)
_CSS_FORBIDDEN = (
    ("@import", "must not use @import"),
    ("expression(", "must not use expression()"),
    ("javascript:", "must not contain javascript: URLs"),
    ("</style", "must not contain </style"),
    ("<", "must not contain '<'"),
    ("behavior:", "must not use behavior:"),
    ("-moz-binding", "must not use -moz-binding"),
)


def default_settings(tenant_id: str, display_name: str) -> pb.TenantSettings:
    return pb.TenantSettings(
        tenant_id=tenant_id,
        branding=pb.Branding(
            company_name=display_name, primary_color=DEFAULT_PRIMARY, secondary_color=DEFAULT_SECONDARY
        ),
        localization=pb.Localization(timezone="UTC", date_format="YYYY-MM-DD", currency="USD", language="en"),
        business_rules=pb.BusinessRules(),
        integrations=pb.Integrations(),
    )


# Update masks


@cache
def updatable_paths() -> frozenset[str]:
    """Every path below the four top-level messages, derived from the descriptors."""
    paths: set[str] = set()

    def walk(prefix: str, descriptor: Descriptor) -> None:
        for field in descriptor.fields:
            path = f"{prefix}.{field.name}"
            paths.add(path)
            if field.message_type is not None and not _is_map(field) and not _repeated(field):
                walk(path, field.message_type)

    for name in TOP_LEVEL:
        paths.add(name)
        message = pb.TenantSettings.DESCRIPTOR.fields_by_name[name].message_type
        assert message is not None
        walk(name, message)
    return frozenset(paths - IGNORED_PATHS)


def mask_paths(update_mask: field_mask_pb2.FieldMask) -> frozenset[str]:
    paths = list(update_mask.paths)
    if not paths or paths == ["*"]:
        return frozenset(TOP_LEVEL)
    bad = [
        FieldViolation("update_mask", f"{path!r} is not a settings field that can be updated")
        for path in paths
        if path not in updatable_paths() and path not in IGNORED_PATHS
    ]
    if bad:
        raise invalid_argument(bad, reason="INVALID_UPDATE_MASK")
    return frozenset(p for p in paths if p not in IGNORED_PATHS)


def _covers(paths: Iterable[str], path: str) -> bool:
    """True when ``path`` is named, or lies below (or above) a named path."""
    return any(p == path or path.startswith(p + ".") or p.startswith(path + ".") for p in paths)


# Validation


def validate(settings: pb.TenantSettings, paths: frozenset[str], v: Violations) -> None:
    """Check the parts of ``settings`` that ``paths`` cover."""
    b, loc, rules, integ = settings.branding, settings.localization, settings.business_rules, settings.integrations
    f = "settings."
    if _covers(paths, "branding.company_name"):
        v.text(f + "branding.company_name", b.company_name, max_len=100)
    if _covers(paths, "branding.logo_url") and b.logo_url:
        problem = _https_problem(b.logo_url, allow_private=True)
        if problem:
            v.add(f + "branding.logo_url", problem)
    for name in ("primary_color", "secondary_color"):
        value = getattr(b, name)
        if _covers(paths, f"branding.{name}") and value and not COLOR.fullmatch(value):
            v.add(f"{f}branding.{name}", "must be a color as #RRGGBB, e.g. #3B82F6 (empty means the default)")
    if _covers(paths, "branding.custom_css") and b.custom_css:
        problem = css_problem(b.custom_css)
        if problem:
            v.add(f + "branding.custom_css", problem)

    if _covers(paths, "localization.timezone") and loc.timezone and loc.timezone not in _zones():
        v.add(f + "localization.timezone", "must be an IANA time zone such as Africa/Nairobi or UTC")
    if _covers(paths, "localization.date_format") and loc.date_format and loc.date_format not in DATE_FORMATS:
        v.add(f + "localization.date_format", f"must be one of {', '.join(sorted(DATE_FORMATS))}")
    if _covers(paths, "localization.currency") and loc.currency and loc.currency not in CURRENCIES:
        v.add(f + "localization.currency", "must be an ISO 4217 currency code in upper case, e.g. KES")
    if _covers(paths, "localization.language") and loc.language:
        if len(loc.language) > 35 or not LANGUAGE.fullmatch(loc.language):
            v.add(f + "localization.language", "must be a BCP 47 language tag such as en or fr-CI")

    if _covers(paths, "business_rules.sla_targets"):
        _numbers(v, f + "business_rules.sla_targets", rules.sla_targets, SLA_RANGE)
    if _covers(paths, "business_rules.alert_thresholds"):
        _numbers(v, f + "business_rules.alert_thresholds", rules.alert_thresholds, THRESHOLD_RANGE)
    if _covers(paths, "business_rules.escalation_rules"):
        _escalation(v, f + "business_rules.escalation_rules", rules.escalation_rules)

    if _covers(paths, "integrations.smtp") and integ.HasField("smtp"):
        _smtp(v, f + "integrations.smtp", integ.smtp, paths)
    if _covers(paths, "integrations.webhook_endpoints"):
        if len(integ.webhook_endpoints) > MAX_WEBHOOKS:
            v.add(f + "integrations.webhook_endpoints", f"must have at most {MAX_WEBHOOKS} entries")
        for i, url in enumerate(integ.webhook_endpoints):
            problem = _https_problem(url, allow_private=False)
            if problem:
                v.add(f"{f}integrations.webhook_endpoints[{i}]", problem)
    if _covers(paths, "integrations.api_keys"):
        if len(integ.api_keys) > MAX_API_KEYS:
            v.add(f + "integrations.api_keys", f"must have at most {MAX_API_KEYS} entries")
        for name, value in sorted(integ.api_keys.items()):
            field = f"{f}integrations.api_keys[{name}]"
            if not METRIC_KEY.fullmatch(name):
                v.add(field, "names must be lower_snake_case, at most 64 characters")
            elif not value:
                v.add(field, "must not be empty (remove the entry to delete the key)")
            elif len(value) > 4096:
                v.add(field, "must be at most 4096 characters")


@cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def css_problem(css: str) -> str | None:
    if len(css.encode()) > MAX_CSS_BYTES:
        return f"must be at most {MAX_CSS_BYTES // 1024} KiB"
    if "\\" in css:
        return "must not contain backslash escapes (they can spell any forbidden word)"
    text = _CSS_COMMENT.sub("", css).lower()
    compact = re.sub(r"\s+", "", text)
    for needle, why in _CSS_FORBIDDEN:
        if needle in text or needle in compact:
            return why
    for match in _CSS_URL.finditer(text):
        target = match.group(2).strip()
        if target.startswith("//") or re.match(r"^[a-z][a-z0-9+.-]*:", target):
            return "url() may only name paths of the platform's own origin, not another origin"
    return None


def _numbers(v: Violations, field: str, values: Mapping[str, float], bounds: tuple[float, float]) -> None:
    if len(values) > MAX_MAP_ENTRIES:
        v.add(field, f"must have at most {MAX_MAP_ENTRIES} entries")
    low, high = bounds
    for key, value in sorted(values.items()):
        if not METRIC_KEY.fullmatch(key):
            v.add(f"{field}[{key}]", "keys must be lower_snake_case, at most 64 characters")
        elif not math.isfinite(value) or not low <= value <= high:
            v.add(f"{field}[{key}]", f"must be a finite number from {low:g} to {high:g}")


def _escalation(v: Violations, field: str, rules: Iterable[pb.EscalationRule]) -> None:
    ordered = list(rules)
    if len(ordered) > MAX_RULES:
        v.add(field, f"must have at most {MAX_RULES} rules")
    levels: set[int] = set()
    for i, rule in enumerate(ordered):
        at = f"{field}[{i}]"
        if rule.level < 1:
            v.add(f"{at}.level", "must be 1 or more")
        elif rule.level in levels:
            v.add(f"{at}.level", f"level {rule.level} appears twice; levels must be distinct")
        levels.add(rule.level)
        if not 0 <= rule.after_minutes <= MAX_AFTER_MINUTES:
            v.add(f"{at}.after_minutes", f"must be from 0 to {MAX_AFTER_MINUTES} (one week)")
        if not rule.notify:
            v.add(f"{at}.notify", "must name at least one recipient")
        elif len(rule.notify) > MAX_RECIPIENTS:
            v.add(f"{at}.notify", f"must name at most {MAX_RECIPIENTS} recipients")
        for j, who in enumerate(rule.notify):
            if not RECIPIENT.fullmatch(who):
                v.add(f"{at}.notify[{j}]", "must be an e-mail address or user id")
    by_level = sorted((r.level, r.after_minutes, i) for i, r in enumerate(ordered) if r.level >= 1)
    for (_, before, _), (_, after, i) in itertools.pairwise(by_level):
        if after <= before:
            v.add(f"{field}[{i}].after_minutes", "must grow with level (a higher level escalates later)")


def _smtp(v: Violations, field: str, smtp: pb.SmtpSettings, paths: frozenset[str]) -> None:
    if not smtp.host:
        v.add(f"{field}.host", "is required when SMTP is configured")
    elif _host_problem(smtp.host):
        v.add(f"{field}.host", "must be a host name such as smtp.operator.example or an IP address")
    if not 1 <= smtp.port <= 65535:
        v.add(f"{field}.port", "must be from 1 to 65535 (typically 587 or 465)")
    v.text(f"{field}.username", smtp.username, max_len=254)
    if len(smtp.password) > 1024:
        v.add(f"{field}.password", "must be at most 1024 characters")


def _host_problem(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return False
    except ValueError:
        pass
    labels = host.lower().rstrip(".").split(".")
    return len(host) > 253 or not all(HOST_LABEL.fullmatch(label) for label in labels)


def _https_problem(url: str, *, allow_private: bool) -> str | None:
    if len(url) > 2048:
        return "must be at most 2048 characters"
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        _ = parts.port
    except ValueError:
        return "must be a valid https:// URL"
    if parts.scheme != "https" or not host:
        return "must be an https:// URL with a host"
    if parts.username is not None or parts.password is not None:
        return "must not carry a user name or password"
    if allow_private:
        return None
    address = _ip_literal(host)
    if address is not None:
        if not address.is_global or address.is_multicast:
            return "must not point to a loopback, link-local, private or reserved address"
        return None
    if _host_problem(host):
        return "must name a valid host"
    if host in ("localhost",) or host.endswith((".localhost", ".local", ".internal")):
        return "must not point to a local or internal host name"
    return None


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``host`` spells, including forms like ``2130706433`` or ``0x7f.1``."""
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = _legacy_ipv4(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    try:
        numbers = [int(p, 0) if not (len(p) > 1 and p.startswith("0") and p.isdigit()) else int(p, 8) for p in parts]
    except ValueError:
        return None
    *head, last = numbers
    if any(not 0 <= n <= 255 for n in head) or not 0 <= last < 256 ** (5 - len(parts)):
        return None
    value = 0
    for n in head:
        value = value * 256 + n
    value = value * 256 ** (5 - len(parts)) + last
    return ipaddress.IPv4Address(value) if value < 2**32 else None


# Merging (AIP-134) and storage


def merge(stored: pb.TenantSettings, update: pb.TenantSettings, paths: frozenset[str]) -> pb.TenantSettings:
    """``stored`` with the parts named by ``paths`` taken from ``update``."""
    merged = pb.TenantSettings()
    merged.CopyFrom(stored)
    mask = field_mask_pb2.FieldMask(paths=sorted(paths))
    mask.MergeMessage(update, merged, replace_message_field=True, replace_repeated_field=True)
    return merged


def _secret_aad(tenant_id: str, path: str) -> str:
    return f"{tenant_id}/{path}"


def to_document(
    settings: pb.TenantSettings, box: SecretBox, tenant_id: str, previous: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The stored form: secrets sealed; ``MASK`` keeps the previously stored secret."""
    plain = pb.TenantSettings()
    plain.CopyFrom(settings)
    plain.tenant_id = ""
    plain.branding.display_name = ""
    old_secrets = dict((previous or {}).get("secrets", {}))
    secrets: dict[str, Any] = {}
    password = plain.integrations.smtp.password
    if password == MASK:
        if "smtp.password" in old_secrets:
            secrets["smtp.password"] = old_secrets["smtp.password"]
    elif password:
        secrets["smtp.password"] = box.seal(password, _secret_aad(tenant_id, "integrations.smtp.password"))
    problems = []
    for name, value in sorted(plain.integrations.api_keys.items()):
        key = f"api_keys.{name}"
        if value == MASK:
            if key not in old_secrets:
                problems.append(
                    FieldViolation(
                        f"settings.integrations.api_keys[{name}]",
                        "no key is stored under this name to keep; send the key",
                    )
                )
            else:
                secrets[key] = old_secrets[key]
        else:
            secrets[key] = box.seal(value, _secret_aad(tenant_id, f"integrations.{key}"))
    if problems:
        raise invalid_argument(problems)
    plain.integrations.smtp.password = ""
    for name in list(plain.integrations.api_keys):
        plain.integrations.api_keys[name] = ""
    return {"settings": json_format.MessageToDict(plain), "secrets": secrets}


def from_document(document: Mapping[str, Any], tenant_id: str) -> pb.TenantSettings:
    """The masked form: ``MASK`` wherever a secret is stored, never the secret."""
    settings = json_format.ParseDict(document.get("settings", {}), pb.TenantSettings(), ignore_unknown_fields=True)
    secrets = document.get("secrets", {})
    if "smtp.password" in secrets:
        settings.integrations.smtp.password = MASK
    for name in list(settings.integrations.api_keys):
        settings.integrations.api_keys[name] = MASK if f"api_keys.{name}" in secrets else ""
    settings.tenant_id = tenant_id
    return settings


def reveal_secret(document: Mapping[str, Any], box: SecretBox, tenant_id: str, path: str) -> str | None:
    """The plaintext of one secret (``smtp.password``, ``api_keys.<name>``), for the senders that use it."""
    envelope = document.get("secrets", {}).get(path)
    return None if envelope is None else box.open(envelope, _secret_aad(tenant_id, f"integrations.{path}"))


def reseal(document: Mapping[str, Any], box: SecretBox, source: str, target: str) -> dict[str, Any]:
    """A copy of ``source``'s settings document whose secrets open only for ``target``."""
    secrets = {
        path: box.seal(
            box.open(envelope, _secret_aad(source, f"integrations.{path}")), _secret_aad(target, f"integrations.{path}")
        )
        for path, envelope in document.get("secrets", {}).items()
    }
    return {"settings": dict(document.get("settings", {})), "secrets": secrets}


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and bool(field.message_type.GetOptions().map_entry)


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)
