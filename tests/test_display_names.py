"""Display names refuse characters that make them read as something else (issue 12, item 6).

The display fields are the ones marked ``(towerco.api.v1.text) = TEXT_KIND_DISPLAY`` in the
protos: a tenant's display name, the branding's company name, a site's name and region.
Each refuses controls, bidi overrides and isolates, zero-width and other invisible format
characters, line separators, private-use characters and non-characters with
INVALID_ARGUMENT naming the field, through the real services; ordinary names in any
script still pass.
"""

from __future__ import annotations

import unicodedata
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.protobuf.descriptor import Descriptor
from towerco.api.v1 import text_pb2
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb

from services.runtime.validation import display_text_problem, is_noncharacter

from .support import bearer, rich_error

#: Refused in every display field: (character, why it is dangerous or meaningless there).
REFUSED = [
    ("\u202e", "RIGHT-TO-LEFT OVERRIDE: shows 'Acme\u202etxt.exe' as 'Acmeexe.txt'"),
    ("\u202a", "LEFT-TO-RIGHT EMBEDDING"),
    ("\u202c", "POP DIRECTIONAL FORMATTING"),
    ("\u2066", "LEFT-TO-RIGHT ISOLATE"),
    ("\u2069", "POP DIRECTIONAL ISOLATE"),
    ("\u200f", "RIGHT-TO-LEFT MARK"),
    ("\u200b", "ZERO WIDTH SPACE: two names that look the same"),
    ("\u200d", "ZERO WIDTH JOINER"),
    ("\u2060", "WORD JOINER"),
    ("\ufeff", "BYTE ORDER MARK"),
    ("\u00ad", "SOFT HYPHEN"),
    ("\u0007", "BELL (control)"),
    ("\u0085", "NEXT LINE (C1 control)"),
    ("\u2028", "LINE SEPARATOR"),
    ("\ue000", "private use"),
    ("\U000f0000", "supplementary private use"),
    ("\uffff", "non-character U+FFFF"),
    ("\ufffe", "non-character U+FFFE"),
    ("\ufdd0", "non-character U+FDD0"),
    ("\U0001fffe", "non-character U+1FFFE"),
]

#: Names in ordinary scripts, which must keep passing (a control for the refusals).
ACCEPTED = [
    "Société Ivoirienne de Télécom",
    "Orange Côte d\u2019Ivoire",
    "اتصالات المغرب",
    "北京移动 Tower 7",
    "\U0001f4e1 Relay Hill",
    "Tower\u00a0West",  # NO-BREAK SPACE is a space, not an invisible character
]


@dataclass
class DisplayField:
    """One display field and how to send a value in it."""

    path: str
    send: Callable[[str], None]


@pytest.fixture(scope="module")
def admin(token: Callable[..., str]) -> tuple[tuple[str, str], ...]:
    """The metadata of a fresh enterprise tenant's admin."""
    return bearer(token(f"dn_{uuid.uuid4().hex[:10]}"))


@pytest.fixture(scope="module")
def display_fields(
    registry: Any, sites: Any, admin: tuple[tuple[str, str], ...], platform_token: str
) -> list[DisplayField]:
    """Every display field, each sent in an otherwise valid request (the tenant admin's, or a new tenant)."""

    def create_tenant(value: str) -> None:
        tenant_id = f"dn_{uuid.uuid4().hex[:10]}"
        request = tenant_pb.CreateTenantRequest(
            tenant_id=tenant_id,
            tenant=tenant_pb.Tenant(display_name=value, plan="basic", admin_email="noc@dn.example"),
        )
        registry.CreateTenant(request, metadata=bearer(platform_token), timeout=10)

    def company_name(value: str) -> None:
        request = tenant_pb.UpdateTenantSettingsRequest(
            settings=tenant_pb.TenantSettings(branding=tenant_pb.Branding(company_name=value)),
            update_mask=field_mask_pb2.FieldMask(paths=["branding.company_name"]),
        )
        registry.UpdateTenantSettings(request, metadata=admin, timeout=10)

    def site(name: str = "Tower", region: str = "") -> None:
        request = sites_pb.CreateSiteRequest(
            site_id=f"s-{uuid.uuid4().hex[:12]}",
            site=sites_pb.Site(name=name, location=sites_pb.Location(latitude=1.0, longitude=2.0, region=region)),
        )
        sites.CreateSite(request, metadata=admin, timeout=10)

    return [
        DisplayField("tenant.display_name", create_tenant),
        DisplayField("settings.branding.company_name", company_name),
        DisplayField("site.name", lambda value: site(name=value)),
        DisplayField("site.location.region", lambda value: site(region=value)),
    ]


def _marked(descriptor: Descriptor, prefix: str = "", seen: frozenset[str] = frozenset()) -> list[str]:
    found = []
    for f in descriptor.fields:
        if f.GetOptions().Extensions[text_pb2.text] == text_pb2.TEXT_KIND_DISPLAY:
            found.append(prefix + f.name)
        elif f.message_type is not None and not f.is_repeated and f.message_type.full_name not in seen:
            found += _marked(f.message_type, f"{prefix}{f.name}.", seen | {descriptor.full_name})
    return found


def test_the_display_fields_are_the_ones_marked_in_the_protos(display_fields: list[DisplayField]) -> None:
    # The cases below cover every field the protos mark, in the requests that write them.
    marked = set(_marked(tenant_pb.CreateTenantRequest.DESCRIPTOR))
    marked |= set(_marked(tenant_pb.UpdateTenantSettingsRequest.DESCRIPTOR))
    marked |= set(_marked(sites_pb.CreateSiteRequest.DESCRIPTOR))
    assert marked == {f.path for f in display_fields}


@pytest.mark.parametrize(("char", "why"), REFUSED, ids=[f"U+{ord(c):04X}" for c, _ in REFUSED])
def test_display_fields_refuse_invisible_and_direction_changing_characters(
    char: str, why: str, display_fields: list[DisplayField]
) -> None:
    wrong = []
    for field in display_fields:
        try:
            field.send(f"Acme{char}Tower")
        except grpc.RpcError as error:
            got = rich_error(error)
            named = got.fields == [field.path] and f"U+{ord(char):04X}" in got.message
            if got.code == grpc.StatusCode.INVALID_ARGUMENT and got.reason == "INVALID_ARGUMENT" and named:
                continue
            wrong.append(f"{field.path}: {got.code.name} {got.reason} {got.fields} {got.message!r}")
        else:
            wrong.append(f"{field.path}: accepted")
    assert not wrong, f"U+{ord(char):04X} {unicodedata.name(char, why)}:\n  " + "\n  ".join(wrong)


@pytest.mark.parametrize("name", ACCEPTED)
def test_display_fields_accept_names_in_any_script(name: str, display_fields: list[DisplayField]) -> None:
    for field in display_fields:
        field.send(name)  # raises (and fails the test) if refused


def test_a_surrogate_cannot_arrive_and_is_invalid_argument_not_internal(
    sites_target: str, admin: tuple[tuple[str, str], ...]
) -> None:
    # Surrogates (Cs) cannot be encoded in UTF-8: a client that sends one anyway (CESU-8
    # bytes) gets INVALID_ARGUMENT for an undecodable request, never INTERNAL.
    request = sites_pb.CreateSiteRequest(site_id="surrogate", site=sites_pb.Site(name="AB\x7f"))
    raw = request.SerializeToString().replace(b"AB\x7f", b"\xed\xa0\x80")
    with grpc.insecure_channel(sites_target) as channel:
        call = channel.unary_unary(
            "/towerco.sites.v1.SiteService/CreateSite",
            request_serializer=lambda data: data,
            response_deserializer=sites_pb.Site.FromString,
        )
        with pytest.raises(grpc.RpcError) as failure:
            call(raw, metadata=admin, timeout=10)
    got = rich_error(failure.value)
    assert got.code == grpc.StatusCode.INVALID_ARGUMENT, got
    assert got.reason == "MALFORMED_REQUEST"


def test_display_rule_refuses_exactly_the_documented_characters() -> None:
    # No server: every code point against the categories text.proto documents, so the
    # rule's fast path (str.isprintable) can never let one of them through, and spaces,
    # letters, marks, symbols and unassigned code points are never refused.
    refused_categories = {"Cc", "Cf", "Zl", "Zp", "Cs", "Co"}
    wrong = []
    for code_point in range(0x110000):
        char = chr(code_point)
        expected = unicodedata.category(char) in refused_categories or is_noncharacter(code_point)
        if (display_text_problem(f"a{char}b") is not None) != expected:
            wrong.append(f"U+{code_point:04X}")
    assert not wrong, wrong[:20]
    assert is_noncharacter(0x10FFFF) and is_noncharacter(0xFDEF) and not is_noncharacter(0xFDF0)
