"""U+0000 in any string field of any request is INVALID_ARGUMENT naming the field (issue 12, item 5).

The cases come from the request descriptors of every service the four processes serve,
public and internal: every string field, nested or repeated, every string map key and
value, and the keys and strings of every ``google.protobuf.Struct``. A new RPC or field is
covered without touching this file. Before the shared check, NUL reached PostgreSQL and
came back INTERNAL (UpdateTenantSettings' ``branding.custom_css`` among others).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from grpc import aio
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb

from services.audit.__main__ import SPEC as AUDIT
from services.features.__main__ import SPEC as FEATURES
from services.runtime.interceptors.error_details import ErrorDetailsInterceptor
from services.runtime.interceptors.request_id import RequestContextInterceptor
from services.runtime.policy import Policy, PolicyTable
from services.runtime.validation import path_key
from services.sites.__main__ import SPEC as SITES
from services.tenant.__main__ import SPEC as TENANT

from .support import bearer, rich_error
from .support.servicers import SitesServing

PROTOS = Path(__file__).resolve().parents[1] / "protos"
BAD = "bad\x00value"
#: Which process serves which gRPC service, from the processes' own specs.
SERVED_BY: dict[str, list[str]] = {}
for _spec in (TENANT, SITES, FEATURES, AUDIT):
    for _service in _spec.services:
        SERVED_BY.setdefault(_service.full_name, []).append(_spec.name)

Setter = Callable[[Any], None]


def _served() -> list[tuple[str, ServiceDescriptor, MethodDescriptor]]:
    """(process, service, method) for every RPC whose request can hold text, in every process."""
    return [
        (spec.name, service, method)
        for spec in (TENANT, SITES, FEATURES, AUDIT)
        for service in spec.services
        for method in service.methods
        if any(nul_cases(method.input_type))
    ]


def _declared_services() -> set[str]:
    names: set[str] = set()
    for proto in PROTOS.glob("towerco/**/*.proto"):
        text = proto.read_text()
        package = next(line.split()[1].rstrip(";") for line in text.splitlines() if line.startswith("package "))
        names |= {f"{package}.{line.split()[1]}" for line in text.splitlines() if line.startswith("service ")}
    return names


def nul_cases(
    descriptor: Descriptor, prefix: str = "", seen: frozenset[str] = frozenset()
) -> Iterator[tuple[str, Setter]]:
    """(field path the refusal must name, a setter that puts a NUL there) for each text slot."""
    seen = seen | {descriptor.full_name}
    for f in descriptor.fields:
        name, path = f.name, prefix + f.name
        message = f.message_type
        if f.type == FieldDescriptor.TYPE_STRING:
            yield (f"{path}[0]", _append(name, BAD)) if f.is_repeated else (path, _set(name, BAD))
        elif message is None or message.full_name in seen:
            continue
        elif message.GetOptions().map_entry:
            yield from _map_cases(f, message, path)
        elif message.full_name == "google.protobuf.Struct":
            for json in ({"k": BAD}, {BAD: 1}, {"a": [1, {"b": BAD}]}):
                yield path, _update(name, json)
        elif message.full_name in ("google.protobuf.Value", "google.protobuf.ListValue"):
            raise AssertionError(f"{path}: add cases for {message.full_name} requests")
        else:
            at = f"{path}[0]." if f.is_repeated else f"{path}."
            for inner, setter in nul_cases(message, at, seen):
                yield inner, _into(name, setter, add=f.is_repeated)


def _map_cases(f: FieldDescriptor, entry: Descriptor, path: str) -> Iterator[tuple[str, Setter]]:
    key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
    name = f.name
    if key.type == FieldDescriptor.TYPE_STRING:
        filler: Any = None if value.message_type else "v" if value.type == FieldDescriptor.TYPE_STRING else 1
        yield f"{path}[{path_key(BAD)}]", _put(name, BAD, filler)
    at = "k" if key.type == FieldDescriptor.TYPE_STRING else 1
    if value.type == FieldDescriptor.TYPE_STRING:
        yield f"{path}[{path_key(at)}]", _put(name, at, BAD)
    elif value.message_type is not None:
        for inner, setter in nul_cases(value.message_type, f"{path}[{path_key(at)}]."):
            yield inner, _into(name, setter, key=at)


def _set(name: str, value: str) -> Setter:
    return lambda m: setattr(m, name, value)


def _append(name: str, value: str) -> Setter:
    return lambda m: getattr(m, name).append(value)


def _update(name: str, json: dict[str, Any]) -> Setter:
    return lambda m: getattr(m, name).update(json)


def _put(name: str, key: Any, value: Any) -> Setter:
    """``m.name[key] = value``; ``value`` None for a message value (the entry is created as is)."""

    def apply(m: Any) -> None:
        if value is None:
            getattr(m, name)[key].SetInParent()
        else:
            getattr(m, name)[key] = value

    return apply


def _into(name: str, setter: Setter, *, add: bool = False, key: Any = None) -> Setter:
    """Apply ``setter`` to the message in field ``name``: a new element, a map entry, or the field."""

    def apply(m: Any) -> None:
        container = getattr(m, name)
        setter(container.add() if add else container[key] if key is not None else container)

    return apply


def _id(case: tuple[str, ServiceDescriptor, MethodDescriptor]) -> str:
    process, service, method = case
    return f"{process}:{service.name}.{method.name}"


@pytest.fixture(scope="module")
def callers(
    token: Callable[..., str], platform_token: str, service_token: Callable[..., str]
) -> Callable[[Policy], tuple[tuple[str, str], ...]]:
    """Metadata for a method's policy, all acting on one fresh tenant (enterprise: every feature, high limits)."""
    tenant = f"nul_{uuid.uuid4().hex[:10]}"
    tenant_admin = token(tenant)  # provisions it, on the enterprise plan
    service = service_token("tenant")

    def metadata(policy: Policy) -> tuple[tuple[str, str], ...]:
        if policy.internal:
            return bearer(service)
        if policy.public:
            return ()
        if policy.cross_tenant:
            return bearer(platform_token, tenant)
        return bearer(tenant_admin)

    return metadata


def test_every_declared_service_is_served_and_covered_here() -> None:
    # A service added to a .proto but to none of the four specs would escape the cases below.
    assert _declared_services() == set(SERVED_BY)


@pytest.mark.parametrize("case", _served(), ids=_id)
def test_nul_in_any_string_field_is_invalid_argument_naming_it(
    case: tuple[str, ServiceDescriptor, MethodDescriptor], stack: Any, callers: Any
) -> None:
    process, service, method = case
    policy = PolicyTable.from_services([service]).get(f"/{service.full_name}/{method.name}")
    assert policy is not None
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    cases = list(nul_cases(method.input_type))
    wrong: list[str] = []
    with grpc.insecure_channel(f"127.0.0.1:{stack.config.ports[process]}") as channel:
        call = channel.unary_unary(
            policy.method,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        for field, setter in cases:
            request: Message = request_class()
            setter(request)
            try:
                call(request, metadata=callers(policy), timeout=10)
            except grpc.RpcError as error:
                got = rich_error(error)
                if (
                    got.code == grpc.StatusCode.INVALID_ARGUMENT
                    and got.reason == "INVALID_ARGUMENT"
                    and field in got.fields
                ):
                    continue
                wrong.append(f"{field}: {got.code.name} {got.reason} {got.fields} {got.message!r}")
            else:
                wrong.append(f"{field}: accepted")
    assert not wrong, f"{policy.method}:\n  " + "\n  ".join(wrong)


def test_nul_in_custom_css_of_a_valid_settings_update_is_invalid_argument(registry: Any, callers: Any) -> None:
    # The reported case, in an otherwise valid request: it reached PostgreSQL and came back INTERNAL.
    policy = PolicyTable.from_services([tenant_pb.DESCRIPTOR.services_by_name["TenantRegistryService"]]).get(
        "/towerco.tenant.v1.TenantRegistryService/UpdateTenantSettings"
    )
    assert policy is not None
    request = tenant_pb.UpdateTenantSettingsRequest(
        settings=tenant_pb.TenantSettings(branding=tenant_pb.Branding(custom_css="body { color: red }\x00")),
        update_mask=field_mask_pb2.FieldMask(paths=["branding.custom_css"]),
    )
    try:
        registry.UpdateTenantSettings(request, metadata=callers(policy), timeout=10)
    except grpc.RpcError as error:
        got = rich_error(error)
    else:
        raise AssertionError("a NUL in custom_css was accepted")
    assert got.code == grpc.StatusCode.INVALID_ARGUMENT, got
    assert got.reason == "INVALID_ARGUMENT" and got.info is not None
    assert got.info.domain == "towerco.tenant.v1.TenantRegistryService"
    assert got.fields == ["settings.branding.custom_css"]
    assert "U+0000" in got.message


def test_nul_inside_a_site_configuration_names_the_field_and_where(sites: Any, callers: Any) -> None:
    policy = PolicyTable.from_services([sites_pb.DESCRIPTOR.services_by_name["SiteService"]]).get(
        "/towerco.sites.v1.SiteService/CreateSite"
    )
    assert policy is not None
    request = sites_pb.CreateSiteRequest(site_id="nul-config", site=sites_pb.Site(name="Tower"))
    request.site.configuration.update({"equipment": [{"model": "R48"}, {"model": "LFP\x00"}]})
    try:
        sites.CreateSite(request, metadata=callers(policy), timeout=10)
    except grpc.RpcError as error:
        got = rich_error(error)
    else:
        raise AssertionError("a NUL in the configuration was accepted")
    assert got.code == grpc.StatusCode.INVALID_ARGUMENT
    assert got.fields == ["site.configuration"]
    assert got.bad_request is not None
    assert "$.equipment[1].model" in got.bad_request.field_violations[0].description


class _StoresAsGiven(SitesServing):
    """GetSite hands ``site_id`` to PostgreSQL as text and as jsonb, like a servicer that forgot a check."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn

    async def GetSite(self, request: sites_pb.GetSiteRequest, ctx: Any) -> sites_pb.Site:
        conn = await asyncpg.connect(self._dsn)
        try:
            if request.site_id == "jsonb":
                await conn.execute("SELECT $1::jsonb", '{"a": "\\u0000"}')
            else:
                await conn.execute("SELECT $1::text", "a\x00b")
        finally:
            await conn.close()
        return sites_pb.Site()


@pytest.mark.parametrize("kind", ["text", "jsonb"])
async def test_nul_that_reaches_postgresql_anyway_is_invalid_argument_not_internal(admin_dsn: str, kind: str) -> None:
    # Defence in depth behind the request check: the error link reads PostgreSQL's refusal
    # of U+0000 (CharacterNotInRepertoire in text, UntranslatableCharacter in jsonb) as
    # the client's, not as INTERNAL. Only the two links it needs, over real PostgreSQL.
    policies = PolicyTable.from_services([sites_pb.DESCRIPTOR.services_by_name["SiteService"]])
    server = aio.server(interceptors=[RequestContextInterceptor(policies), ErrorDetailsInterceptor(policies)])
    sites_grpc.add_SiteServiceServicer_to_server(_StoresAsGiven(admin_dsn), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(aio.AioRpcError) as failure:
                await sites_grpc.SiteServiceStub(channel).GetSite(sites_pb.GetSiteRequest(site_id=kind), timeout=10)
    finally:
        await server.stop(None)
    got = rich_error(failure.value)
    assert got.code == grpc.StatusCode.INVALID_ARGUMENT, got
    assert got.reason == "INVALID_ARGUMENT" and got.fields == ["request"]
