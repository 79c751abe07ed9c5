"""TenantSettings: defaults, update masks, validation, merging (stored and sealed by ``tenant_settings_store.py``).

Every rule reports its own field violation, named by its path in the request
(``settings.branding.primary_color``, ``settings.integrations.webhook_endpoints[0]``), so
a settings form can mark each bad field. No plaintext secret ever enters an error, a
log line, a cache or a response: reads carry ``MASK`` wherever a secret is stored.

An empty color or localization field means its documented default and is stored as it,
so reads always show a concrete value. An SMTP message with nothing set is the same as
none: the platform's mail server.
"""

from __future__ import annotations

import itertools
import math
import re
import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from functools import cache

from google.protobuf import field_mask_pb2
from google.protobuf.message import Message
from towerco.tenant.v1 import tenant_registry_service_pb2 as pb

from services.runtime.errors import ErrorReason, FieldViolation, invalid_argument
from services.runtime.field_behavior import MaskPaths
from services.runtime.validation import Violations, path_key

from . import custom_css
from .egress import host_problem, url_problem
from .secrets import MASK

#: Update-mask paths from the TenantSettings proto; its fixed ones (tenant_id, an output-only
#: display name) are ignored in a mask, as the proto documents.
MASK_PATHS = MaskPaths.of(pb.TenantSettings.DESCRIPTOR)
_PARTS = ", ".join(f.name for f in pb.TenantSettings.DESCRIPTOR.fields if f.name in MASK_PATHS.top_level)
#: What an empty value of these fields means, and is stored as.
DEFAULTS: Mapping[str, str] = {
    "branding.primary_color": "#3B82F6",
    "branding.secondary_color": "#6B7280",
    "localization.timezone": "UTC",
    "localization.date_format": "YYYY-MM-DD",
    "localization.currency": "USD",
    "localization.language": "en",
}
DEFAULT_PRIMARY, DEFAULT_SECONDARY = DEFAULTS["branding.primary_color"], DEFAULTS["branding.secondary_color"]

#: Date formats the UI knows how to render.
DATE_FORMATS = frozenset(
    {"YYYY-MM-DD", "DD/MM/YYYY", "MM/DD/YYYY", "DD.MM.YYYY", "DD-MM-YYYY", "YYYY/MM/DD", "DD MMM YYYY"}
)
#: ISO 4217 list one as of 2026 (ANG and BGN withdrawn; XCG, XAD, ZWG added), funds and X codes included.
CURRENCIES = frozenset(
    """AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BHD BIF BMD BND BOB BOV BRL BSD BTN BWP BYN BZD CAD CDF
    CHE CHF CHW CLF CLP CNY COP COU CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD
    GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP
    LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB
    PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB
    TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD USN UYI UYU UYW UZS VED VES VND VUV WST XAD XAF XAG XAU XBA XBB
    XBC XBD XCD XCG XDR XOF XPD XPF XPT XSU XTS XUA XXX YER ZAR ZMW ZWG""".split()
)
#: BCP 47 language[-script][-region][-variant...], case-insensitive.
LANGUAGE = re.compile(
    r"^[a-zA-Z]{2,3}(-[a-zA-Z]{4})?(-([a-zA-Z]{2}|[0-9]{3}))?(-([a-zA-Z0-9]{5,8}|[0-9][a-zA-Z0-9]{3}))*$"
)
COLOR = re.compile(r"^#[0-9A-Fa-f]{6}$")
METRIC_KEY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
RECIPIENT = re.compile(r"^[A-Za-z0-9._@+-]{1,254}$")
MAX_COMPANY_NAME, MAX_LANGUAGE = 100, 35
MAX_MAP_ENTRIES, MAX_RULES, MAX_RECIPIENTS, MAX_WEBHOOKS, MAX_API_KEYS = 100, 20, 20, 20, 20
MAX_SMTP_USERNAME, MAX_SMTP_PASSWORD, MAX_API_KEY = 254, 1024, 4096
SLA_RANGE, THRESHOLD_RANGE = (0.0, 1e6), (-1e9, 1e9)
MAX_AFTER_MINUTES = 7 * 24 * 60

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NOT_ZONES = frozenset({"localtime", "Factory", "posixrules"})
NO_PASSWORD_TO_KEEP = f"is {MASK} (keep the stored password) but none is stored; send the password or leave it empty"
NO_KEY_TO_KEEP = f"is {MASK} (keep the stored key) but no key is stored under this name; send the key"


def default_settings(tenant_id: str, display_name: str) -> pb.TenantSettings:
    settings = pb.TenantSettings(
        tenant_id=tenant_id,
        branding=pb.Branding(company_name=display_name),
        business_rules=pb.BusinessRules(),
        integrations=pb.Integrations(),
    )
    fill_defaults(settings)
    return settings


# Update masks


def mask_paths(update_mask: field_mask_pb2.FieldMask) -> frozenset[str]:
    """The paths an update changes: all four parts for an empty mask or ``*``; fixed ones dropped."""
    paths = list(update_mask.paths)
    if not paths or paths == ["*"]:
        return MASK_PATHS.top_level
    bad = [
        FieldViolation(
            "update_mask",
            f"{path_key(path)!r} is not a settings field that can be updated; name {_PARTS} "
            "or a field below them such as branding.logo_url",
        )
        for path in paths
        if path not in MASK_PATHS.updatable and path not in MASK_PATHS.fixed
    ]
    if bad:
        raise invalid_argument(bad, reason=ErrorReason.INVALID_UPDATE_MASK)
    return frozenset(p for p in paths if p not in MASK_PATHS.fixed)


def _covered(paths: Iterable[str], path: str) -> bool:
    """True when ``path`` or a message above it is named: an update replaces it."""
    return any(p == path or path.startswith(p + ".") for p in paths)


def _touched(paths: Iterable[str], path: str) -> bool:
    """True when ``path``, a message above it or a field below it is named."""
    return any(p == path or path.startswith(p + ".") or p.startswith(path + ".") for p in paths)


# Validation


def validate(
    settings: pb.TenantSettings, paths: frozenset[str], v: Violations, *, stored: pb.TenantSettings | None = None
) -> None:
    """Check the parts of ``settings`` that ``paths`` cover.

    ``stored`` is the tenant's current settings in masked form (``from_document``). With it,
    rules that span fields (an SMTP host for a port named alone) are checked on the merged
    result, and ``MASK`` is refused where nothing is stored to keep; without it, they are
    checked only when the update replaces the whole SMTP message.
    """
    subject = merge(stored, settings, paths) if stored is not None else settings

    def covered(path: str) -> bool:
        return _covered(paths, path)

    # url() in custom CSS may name only the logo's host: unknown until the stored logo is read,
    # unless this update sets the logo too.
    logo = subject.branding.logo_url if stored is not None or covered("branding.logo_url") else None
    _branding(v, subject.branding, covered, logo)
    _localization(v, subject.localization, covered)
    rules, at = subject.business_rules, "settings.business_rules"
    if covered("business_rules.sla_targets"):
        _numbers(v, f"{at}.sla_targets", rules.sla_targets, SLA_RANGE)
    if covered("business_rules.alert_thresholds"):
        _numbers(v, f"{at}.alert_thresholds", rules.alert_thresholds, THRESHOLD_RANGE)
    if covered("business_rules.escalation_rules"):
        _escalation(v, f"{at}.escalation_rules", rules.escalation_rules)
    if _touched(paths, "integrations.smtp"):
        whole = covered("integrations.smtp") or stored is not None
        _smtp(v, subject.integrations.smtp, covered, stored, whole=whole)
    if covered("integrations.webhook_endpoints"):
        _webhooks(v, subject.integrations.webhook_endpoints)
    if covered("integrations.api_keys"):
        _api_keys(v, subject.integrations.api_keys, stored)


def _branding(v: Violations, b: pb.Branding, covered: Callable[[str], bool], logo: str | None) -> None:
    at = "settings.branding"
    if covered("branding.company_name"):
        v.text(f"{at}.company_name", b.company_name, max_len=MAX_COMPANY_NAME)
    if covered("branding.logo_url") and b.logo_url:
        problem = url_problem(b.logo_url, public=False)
        if problem:
            v.add(f"{at}.logo_url", problem)
            logo = None  # a bad logo is its own violation; url() in the CSS is judged once it is fixed
    for name in ("primary_color", "secondary_color"):
        value, default = getattr(b, name), DEFAULTS[f"branding.{name}"]
        if covered(f"branding.{name}") and value and not COLOR.fullmatch(value):
            v.add(f"{at}.{name}", f"must be a color as #RRGGBB such as {default} (empty means {default})")
    if covered("branding.custom_css") and b.custom_css:
        problem = custom_css.problem(b.custom_css, logo)
        if problem:
            v.add(f"{at}.custom_css", problem)


def _localization(v: Violations, loc: pb.Localization, covered: Callable[[str], bool]) -> None:
    at = "settings.localization"
    if covered("localization.timezone") and loc.timezone and loc.timezone not in _zones():
        v.add(f"{at}.timezone", "must be an IANA time zone such as Africa/Nairobi or UTC (names are case-sensitive)")
    if covered("localization.date_format") and loc.date_format and loc.date_format not in DATE_FORMATS:
        v.add(f"{at}.date_format", f"must be one of {', '.join(sorted(DATE_FORMATS))}")
    if covered("localization.currency") and loc.currency and loc.currency not in CURRENCIES:
        v.add(f"{at}.currency", "must be an ISO 4217 currency code in upper case, e.g. KES")
    if covered("localization.language") and loc.language:
        if len(loc.language) > MAX_LANGUAGE or not LANGUAGE.fullmatch(loc.language):
            v.add(f"{at}.language", "must be a BCP 47 language tag such as en, fr-CI or zh-Hant-TW")


@cache
def _zones() -> frozenset[str]:
    zones = frozenset(zoneinfo.available_timezones()) - _NOT_ZONES
    if not zones:
        raise RuntimeError("no IANA time zone database found; install the tzdata package")
    return zones


def _numbers(v: Violations, field: str, values: Mapping[str, float], bounds: tuple[float, float]) -> None:
    if len(values) > MAX_MAP_ENTRIES:
        v.add(field, f"must have at most {MAX_MAP_ENTRIES} entries (got {len(values)})")
    low, high = bounds
    for key, value in sorted(values.items()):
        if not METRIC_KEY.fullmatch(key):
            v.add(f"{field}[{path_key(key)}]", "keys must be lower_snake_case, at most 64 characters")
        elif not math.isfinite(value) or not low <= value <= high:
            v.add(f"{field}[{key}]", f"must be a finite number from {low:,.0f} to {high:,.0f}")


def _escalation(v: Violations, field: str, rules: Iterable[pb.EscalationRule]) -> None:
    ordered = list(rules)
    if len(ordered) > MAX_RULES:
        v.add(field, f"must have at most {MAX_RULES} rules (got {len(ordered)})")
    first_at_level: dict[int, int] = {}
    for i, rule in enumerate(ordered):
        at = f"{field}[{i}]"
        if rule.level < 1:
            v.add(f"{at}.level", "must be 1 or more")
        elif rule.level in first_at_level:
            v.add(f"{at}.level", f"must be distinct; escalation_rules[{first_at_level[rule.level]}] has it too")
        else:
            first_at_level[rule.level] = i
        if not 0 <= rule.after_minutes <= MAX_AFTER_MINUTES:
            v.add(f"{at}.after_minutes", f"must be from 0 to {MAX_AFTER_MINUTES} (one week)")
        if not rule.notify:
            v.add(f"{at}.notify", "must name at least one e-mail address or user id")
        elif len(rule.notify) > MAX_RECIPIENTS:
            v.add(f"{at}.notify", f"must name at most {MAX_RECIPIENTS} recipients (got {len(rule.notify)})")
        for j, who in enumerate(rule.notify):
            if not RECIPIENT.fullmatch(who):
                v.add(f"{at}.notify[{j}]", "must be an e-mail address or user id (letters, digits, . _ @ + -)")
    for (low, i), (_, j) in itertools.pairwise(sorted(first_at_level.items())):
        if ordered[j].after_minutes <= ordered[i].after_minutes:
            v.add(
                f"{field}[{j}].after_minutes",
                f"must be later than level {low}'s {ordered[i].after_minutes} minutes: a higher level escalates later",
            )


def configured(smtp: pb.SmtpSettings) -> bool:
    return bool(smtp.host or smtp.port or smtp.username or smtp.password or smtp.tls)


def _smtp(
    v: Violations,
    smtp: pb.SmtpSettings,
    covered: Callable[[str], bool],
    stored: pb.TenantSettings | None,
    *,
    whole: bool,
) -> None:
    at = "settings.integrations.smtp"
    if covered("integrations.smtp.host") and smtp.host:
        problem = host_problem(smtp.host, public=True)
        if problem:
            v.add(f"{at}.host", problem)
    if covered("integrations.smtp.port") and smtp.port and not 1 <= smtp.port <= 65535:
        v.add(f"{at}.port", "must be from 1 to 65535 (typically 587 or 465)")
    if covered("integrations.smtp.username"):
        v.text(f"{at}.username", smtp.username, max_len=MAX_SMTP_USERNAME)
    if covered("integrations.smtp.password"):
        if len(smtp.password) > MAX_SMTP_PASSWORD:
            v.add(f"{at}.password", f"must be at most {MAX_SMTP_PASSWORD} characters")
        elif smtp.password == MASK and stored is not None and stored.integrations.smtp.password != MASK:
            v.add(f"{at}.password", NO_PASSWORD_TO_KEEP)
    if whole and configured(smtp):
        if not smtp.host:
            v.add(f"{at}.host", "is required when any SMTP setting is set (clear them all for the platform's server)")
        if not smtp.port:
            v.add(f"{at}.port", "is required when SMTP is configured: 1 to 65535, typically 587 or 465")


def _webhooks(v: Violations, urls: Iterable[str]) -> None:
    at = "settings.integrations.webhook_endpoints"
    endpoints = list(urls)
    if len(endpoints) > MAX_WEBHOOKS:
        v.add(at, f"must have at most {MAX_WEBHOOKS} entries (got {len(endpoints)})")
    first: dict[str, int] = {}
    for i, url in enumerate(endpoints):
        problem = url_problem(url, public=True)
        if problem:
            v.add(f"{at}[{i}]", problem)
        elif url in first:
            v.add(f"{at}[{i}]", f"repeats webhook_endpoints[{first[url]}]")
        first.setdefault(url, i)


def _api_keys(v: Violations, keys: Mapping[str, str], stored: pb.TenantSettings | None) -> None:
    at = "settings.integrations.api_keys"
    if len(keys) > MAX_API_KEYS:
        v.add(at, f"must have at most {MAX_API_KEYS} entries (got {len(keys)})")
    for name, value in sorted(keys.items()):
        field = f"{at}[{path_key(name)}]"
        if not METRIC_KEY.fullmatch(name):
            v.add(field, "names must be lower_snake_case, at most 64 characters")
        elif value == MASK:
            if stored is not None and stored.integrations.api_keys.get(name) != MASK:
                v.add(field, NO_KEY_TO_KEEP)
        elif not value:
            v.add(field, "must not be empty (remove the entry to delete the key)")
        elif len(value) > MAX_API_KEY:
            v.add(field, f"must be at most {MAX_API_KEY} characters")
        elif _CONTROL.search(value):
            v.add(field, "must not contain control characters or line breaks")


# Merging (AIP-134)


def merge(stored: pb.TenantSettings, update: pb.TenantSettings, paths: Iterable[str]) -> pb.TenantSettings:
    """``stored`` with the fields named by ``paths`` taken from ``update``.

    A message path replaces that message whole (absent in ``update``: cleared); a leaf is
    set even when its parent message is absent in ``update`` (to its default); maps and
    repeated fields are replaced whole. Output-only fields stay as stored.
    """
    merged = pb.TenantSettings()
    merged.CopyFrom(stored)
    for path in sorted(paths):  # a message sorts before the fields below it
        *parents, name = path.split(".")
        source: Message = update
        target: Message = merged
        for parent in parents:
            source, target = getattr(source, parent), getattr(target, parent)
        field = target.DESCRIPTOR.fields_by_name[name]
        if field.is_repeated:
            target.ClearField(name)
            getattr(target, name).MergeFrom(getattr(source, name))
        elif field.message_type is not None:
            target.ClearField(name)
            if source.HasField(name):
                getattr(target, name).CopyFrom(getattr(source, name))
        else:
            setattr(target, name, getattr(source, name))
    merged.tenant_id = stored.tenant_id
    merged.branding.display_name = stored.branding.display_name
    return merged


def fill_defaults(settings: pb.TenantSettings) -> None:
    for path, value in DEFAULTS.items():
        part, name = path.split(".")
        message = getattr(settings, part)
        if not getattr(message, name):
            setattr(message, name, value)
