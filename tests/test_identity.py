"""Who may call the sites service, and for which tenant: every refusal over real gRPC.

Each case sends one deliberately wrong credential (or tenant header, or permission set)
to the running sites service and checks the status code and the ErrorInfo it carries.
Tokens that must be refused are built by hand where the JWT library would refuse to
build them (``alg: none``, HS256 key confusion).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from towerco.api.v1 import policy_pb2
from towerco.sites.v1 import sites_service_pb2 as pb

from deploy.local.tokens import KID
from services.runtime.auth import MAX_TOKEN_BYTES, KeySet, TokenError, TokenVerifier, VerifierConfig
from services.runtime.policy import PolicyError, PolicyTable
from services.runtime.roles import ROLE_PERMISSIONS
from services.runtime.settings import DEFAULT_JWT_AUDIENCE, DEFAULT_JWT_ISSUER

from .support import RichError, bearer, expect_error, rich_error

DOMAIN = "towerco.sites.v1.SiteService"
SITES_LOG = Path(__file__).resolve().parents[1] / "test-output" / "logs" / "sites.log"


# --- hand-made tokens ------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def claims_for(tenant: str, **overrides: Any) -> dict[str, Any]:
    """Claims of a valid admin token of ``tenant``; an override of None removes the claim."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": DEFAULT_JWT_ISSUER,
        "aud": DEFAULT_JWT_AUDIENCE,
        "sub": f"hand-made@{tenant}",
        "tenant_id": tenant,
        "role": "admin",
        "permissions": list(ROLE_PERMISSIONS["admin"]),
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "jti": uuid.uuid4().hex,
    }
    for name, value in overrides.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def signing_key_pem(keys_dir: Path) -> bytes:
    return (keys_dir / "dev-signing-key.pem").read_bytes()


def public_key_pem(keys_dir: Path) -> bytes:
    private = serialization.load_pem_private_key(signing_key_pem(keys_dir), password=None)
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def fresh_rsa_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def rs256(claims: dict[str, Any], key_pem: bytes, kid: str = KID) -> str:
    return jwt.encode(claims, key_pem, algorithm="RS256", headers={"kid": kid})


@pytest.fixture
def sign(stack: Any) -> Callable[[dict[str, Any]], str]:
    """Sign claims with the real dev key and kid: only the claims decide the outcome."""
    key = signing_key_pem(stack.keys_dir)
    return lambda claims: rs256(claims, key)


# --- assertions ------------------------------------------------------------------------


def list_sites_error(sites: Any, metadata: Sequence[tuple[str, str]]) -> RichError:
    return expect_error(sites.ListSites, pb.ListSitesRequest(), metadata=metadata)


def assert_unauthenticated(error: RichError, reason: str, says: str = "") -> None:
    assert error.code == grpc.StatusCode.UNAUTHENTICATED, error
    assert error.info is not None, error
    assert error.info.reason == reason
    assert error.info.domain == DOMAIN
    assert says.lower() in error.message.lower(), error.message


def assert_no_site(sites: Any, tenant_token: str, site_id: str) -> None:
    error = expect_error(sites.GetSite, pb.GetSiteRequest(site_id=site_id), metadata=bearer(tenant_token))
    assert error.code == grpc.StatusCode.NOT_FOUND, error
    listed = sites.ListSites(pb.ListSitesRequest(), metadata=bearer(tenant_token), timeout=10)
    assert site_id not in [s.site_id for s in listed.sites]


def create_site(sites: Any, tenant_token: str, site_id: str, **metadata: str) -> pb.Site:
    request = pb.CreateSiteRequest(site_id=site_id, site=pb.Site(name=f"Site {site_id}"))
    site: pb.Site = sites.CreateSite(request, metadata=bearer(tenant_token, **metadata), timeout=10)
    return site


# --- the control: a hand-built token that is right is accepted ---------------------------


def test_hand_built_valid_token_is_accepted(sites, sign, tenant_pair):
    # Every refusal below changes one thing in this token; this proves the rest is right.
    tenant, _ = tenant_pair
    reply = sites.ListSites(pb.ListSitesRequest(), metadata=bearer(sign(claims_for(tenant))), timeout=10)
    assert list(reply.sites) == []


# --- missing or unusable authorization header --------------------------------------------


def test_no_authorization_header(sites):
    error = list_sites_error(sites, [])
    assert_unauthenticated(error, "TOKEN_MISSING", "bearer token is required")


def test_basic_scheme_is_refused(sites):
    error = list_sites_error(sites, [("authorization", "Basic dXNlcjpwYXNz")])
    assert_unauthenticated(error, "TOKEN_MISSING", "Bearer <JWT>")


def test_bearer_with_empty_token(sites):
    error = list_sites_error(sites, [("authorization", "Bearer ")])
    assert_unauthenticated(error, "TOKEN_MISSING", "Bearer <JWT>")


# --- forged or foreign signatures ---------------------------------------------------------


def test_alg_none_token_is_refused(sites, tenant_pair):
    tenant, _ = tenant_pair
    header = {"alg": "none", "kid": KID, "typ": "JWT"}
    unsigned = f"{b64json(header)}.{b64json(claims_for(tenant))}."
    error = list_sites_error(sites, bearer(unsigned))
    assert_unauthenticated(error, "TOKEN_INVALID", "'none' is not allowed")


def test_hs256_signed_with_public_key_is_refused(sites, stack, tenant_pair):
    # Key confusion: a verifier that took `alg` from the token would check this HMAC
    # with the RSA public key as the secret, and the attacker knows that key.
    tenant, _ = tenant_pair
    secret = public_key_pem(stack.keys_dir)
    signing_input = f"{b64json({'alg': 'HS256', 'kid': KID, 'typ': 'JWT'})}.{b64json(claims_for(tenant))}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{b64url(signature)}"
    error = list_sites_error(sites, bearer(forged))
    assert_unauthenticated(error, "TOKEN_INVALID", "'HS256' is not allowed")


def test_unknown_kid_is_refused(sites, tenant_pair):
    tenant, _ = tenant_pair
    token = rs256(claims_for(tenant), fresh_rsa_pem(), kid="nope")
    error = list_sites_error(sites, bearer(token))
    assert_unauthenticated(error, "TOKEN_INVALID", "unknown signing key 'nope'")


def test_right_kid_signed_by_another_key_is_refused(sites, tenant_pair):
    tenant, _ = tenant_pair
    token = rs256(claims_for(tenant), fresh_rsa_pem(), kid=KID)
    error = list_sites_error(sites, bearer(token))
    assert_unauthenticated(error, "TOKEN_INVALID", "signature or claims are invalid")


# --- time-bound claims ----------------------------------------------------------------------


def test_expired_token(sites, sign, tenant_pair):
    tenant, _ = tenant_pair
    now = int(time.time())
    token = sign(claims_for(tenant, iat=now - 600, nbf=now - 600, exp=now - 120))
    error = list_sites_error(sites, bearer(token))
    assert_unauthenticated(error, "TOKEN_EXPIRED", "expired")


def test_token_expired_within_leeway_is_still_accepted(sites, sign, tenant_pair):
    # The counterpart of the case above: 30 s of clock skew are tolerated.
    tenant, _ = tenant_pair
    now = int(time.time())
    token = sign(claims_for(tenant, iat=now - 600, nbf=now - 600, exp=now - 5))
    reply = sites.ListSites(pb.ListSitesRequest(), metadata=bearer(token), timeout=10)
    assert list(reply.sites) == []


def test_token_not_yet_valid(sites, sign, tenant_pair):
    tenant, _ = tenant_pair
    token = sign(claims_for(tenant, nbf=int(time.time()) + 600))
    error = list_sites_error(sites, bearer(token))
    assert_unauthenticated(error, "TOKEN_NOT_YET_VALID", "not valid yet")


def test_missing_exp(sites, sign, tenant_pair):
    tenant, _ = tenant_pair
    error = list_sites_error(sites, bearer(sign(claims_for(tenant, exp=None))))
    assert_unauthenticated(error, "TOKEN_INVALID", "'exp'")


# --- issuer, audience and the claims a caller is made of ---------------------------------------


def test_wrong_issuer(sites, sign, tenant_pair):
    tenant, _ = tenant_pair
    error = list_sites_error(sites, bearer(sign(claims_for(tenant, iss="https://evil.example"))))
    assert_unauthenticated(error, "TOKEN_INVALID", "issuer")


def test_wrong_audience(sites, sign, tenant_pair):
    tenant, _ = tenant_pair
    error = list_sites_error(sites, bearer(sign(claims_for(tenant, aud="some-other-api"))))
    assert_unauthenticated(error, "TOKEN_INVALID", "audience")


def test_missing_tenant_id_claim(sites, sign, tenant_pair):
    tenant, _ = tenant_pair
    error = list_sites_error(sites, bearer(sign(claims_for(tenant, tenant_id=None))))
    assert_unauthenticated(error, "TOKEN_INVALID", "'tenant_id'")


def test_missing_sub_claim(sites, sign, tenant_pair):
    tenant, _ = tenant_pair
    error = list_sites_error(sites, bearer(sign(claims_for(tenant, sub=None))))
    assert_unauthenticated(error, "TOKEN_INVALID", "'sub'")


def test_malformed_tenant_id_claim(sites, sign, tenant_pair):
    tenant, _ = tenant_pair
    error = list_sites_error(sites, bearer(sign(claims_for(tenant, tenant_id="Tenant A!"))))
    assert_unauthenticated(error, "TOKEN_INVALID", "not a valid tenant id")


def test_malformed_token(sites):
    error = list_sites_error(sites, bearer("abc.def"))
    assert_unauthenticated(error, "TOKEN_INVALID", "malformed")


def test_oversized_token_is_refused_before_parsing(stack, sign, tenant_pair):
    # Deterministic half: a correctly signed token is refused for its size alone.
    tenant, _ = tenant_pair
    token = sign(claims_for(tenant, blob="x" * MAX_TOKEN_BYTES))
    assert len(token) > MAX_TOKEN_BYTES
    verifier = TokenVerifier(
        VerifierConfig(DEFAULT_JWT_ISSUER, DEFAULT_JWT_AUDIENCE, jwks_file=str(stack.keys_dir / "jwks.json"))
    )
    with pytest.raises(TokenError, match="larger than 8 KiB") as refused:
        verifier.verify(token)
    assert refused.value.reason == "TOKEN_INVALID"
    # The same claims without the padding verify: only the size was wrong.
    assert verifier.verify(sign(claims_for(tenant))).tenant_id == tenant


@pytest.mark.parametrize("extra_bytes", [16, 12 * 1024])
def test_oversized_token_over_grpc(sites, sign, tenant_pair, extra_bytes):
    # Correctly signed tokens over 8 KiB: the server's metadata limits leave room for them
    # to reach the authentication link, which refuses every one as UNAUTHENTICATED.
    tenant, _ = tenant_pair
    base = sign(claims_for(tenant, blob=""))
    token = sign(claims_for(tenant, blob="x" * ((MAX_TOKEN_BYTES - len(base) + extra_bytes) * 3 // 4)))
    assert len(token) > MAX_TOKEN_BYTES
    for _ in range(20):
        error = list_sites_error(sites, bearer(token))
        assert_unauthenticated(error, "TOKEN_INVALID", "larger than 8 KiB")


def test_undecodable_request_is_invalid_argument(sites_target, token, tenant_pair):
    """Bytes that are not a GetSiteRequest are the client's error, never INTERNAL."""
    tenant, _ = tenant_pair
    with grpc.insecure_channel(sites_target) as channel:
        raw = channel.unary_unary(
            "/towerco.sites.v1.SiteService/GetSite", request_serializer=None, response_deserializer=None
        )
        try:
            raw(b"\xff\xff\xff\xff", metadata=bearer(token(tenant)), timeout=10)
        except grpc.RpcError as exc:
            error = rich_error(exc)
        else:
            raise AssertionError("undecodable request was accepted")
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "MALFORMED_REQUEST"
    assert error.fields == ["request"]


def test_method_without_policy_does_not_exist(sites_target, token, tenant_pair):
    tenant, _ = tenant_pair
    with grpc.insecure_channel(sites_target) as channel:
        raw = channel.unary_unary(
            "/towerco.sites.v1.SiteService/DropEverything", request_serializer=None, response_deserializer=None
        )
        try:
            raw(b"", metadata=bearer(token(tenant)), timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNIMPLEMENTED
        else:
            raise AssertionError("an undeclared method answered")


# --- the tenant a call acts on -------------------------------------------------------------------


def _log_lines_with(*needles: str) -> list[str]:
    deadline = time.monotonic() + 5
    while True:
        text = SITES_LOG.read_text(errors="replace") if SITES_LOG.exists() else ""
        found = [line for line in text.splitlines() if all(n in line for n in needles)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_cross_tenant_header_is_denied_and_logged(sites, token, tenant_pair):
    tenant_a, tenant_b = tenant_pair
    request_id = f"xt-{uuid.uuid4().hex}"
    metadata = bearer(token(tenant_a), tenant_b, **{"x-request-id": request_id})
    error = list_sites_error(sites, metadata)
    assert error.code == grpc.StatusCode.PERMISSION_DENIED, error
    assert error.reason == "CROSS_TENANT_DENIED"
    assert error.info is not None and error.info.domain == DOMAIN
    assert dict(error.info.metadata) == {"token_tenant": tenant_a, "requested_tenant": tenant_b}
    lines = _log_lines_with("cross-tenant attempt", f"of tenant {tenant_a} asked for tenant {tenant_b}")
    assert len(lines) == 1, lines
    assert "WARNING" in lines[0]
    assert f"request={request_id}" in lines[0]


def test_tenant_header_equal_to_token_tenant_is_accepted(sites, token, tenant_pair):
    tenant_a, _ = tenant_pair
    created = create_site(sites, token(tenant_a), "SAME-1", **{"x-tenant-id": tenant_a})
    assert created.tenant_id == tenant_a
    got = sites.GetSite(pb.GetSiteRequest(site_id="SAME-1"), metadata=bearer(token(tenant_a), tenant_a), timeout=10)
    assert got.tenant_id == tenant_a


def test_malformed_tenant_header(sites, token, tenant_pair):
    tenant_a, _ = tenant_pair
    error = list_sites_error(sites, bearer(token(tenant_a), "Tenant A!"))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.reason == "TENANT_ID_INVALID"
    assert error.info is not None and error.info.domain == DOMAIN
    assert error.fields == ["metadata.x-tenant-id"]


@pytest.mark.parametrize("order", ["own-first", "other-first"])
def test_tenant_header_sent_twice(sites, token, tenant_pair, order):
    tenant_a, tenant_b = tenant_pair
    headers = [tenant_a, tenant_b] if order == "own-first" else [tenant_b, tenant_a]
    admin_a = token(tenant_a)
    metadata = [*bearer(admin_a), *(("x-tenant-id", h) for h in headers)]
    request = pb.CreateSiteRequest(site_id="TWICE-1", site=pb.Site(name="Twice"))
    error = expect_error(sites.CreateSite, request, metadata=metadata)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.reason == "METADATA_REPEATED"
    assert error.fields == ["metadata.x-tenant-id"]
    # Neither value was picked: nothing was created under either tenant.
    assert_no_site(sites, admin_a, "TWICE-1")
    assert_no_site(sites, token(tenant_b), "TWICE-1")


def test_platform_admin_cannot_name_another_tenant_on_site_service(sites, token, tenant_pair):
    # SiteService declares no `platform_admin_cross_tenant`: even a platform admin acts
    # on its own tenant only.
    tenant_a, _ = tenant_pair
    platform = token("platform", role="platform_admin")
    request = pb.CreateSiteRequest(site_id="PA-1", site=pb.Site(name="By the platform"))
    error = expect_error(sites.CreateSite, request, metadata=bearer(platform, tenant_a))
    assert error.code == grpc.StatusCode.PERMISSION_DENIED, error
    assert error.reason == "CROSS_TENANT_DENIED"
    assert error.info is not None and dict(error.info.metadata)["requested_tenant"] == tenant_a
    assert_no_site(sites, token(tenant_a), "PA-1")


# --- permissions ---------------------------------------------------------------------------------


def test_create_without_sites_write_is_denied(sites, token, tenant_pair):
    tenant_a, _ = tenant_pair
    reader = token(tenant_a, permissions=["sites.read", "tenants.read"])
    request = pb.CreateSiteRequest(site_id="NOPERM-1", site=pb.Site(name="No permission"))
    error = expect_error(sites.CreateSite, request, metadata=bearer(reader))
    assert error.code == grpc.StatusCode.PERMISSION_DENIED, error
    assert error.reason == "PERMISSION_MISSING"
    assert error.info is not None and error.info.domain == DOMAIN
    assert dict(error.info.metadata) == {"permission": "sites.write"}
    assert_no_site(sites, token(tenant_a), "NOPERM-1")


def test_viewer_reads_but_cannot_create(sites, token, tenant_pair):
    tenant_a, _ = tenant_pair
    create_site(sites, token(tenant_a), "VIEW-1")
    viewer = token(tenant_a, role="viewer")
    got = sites.GetSite(pb.GetSiteRequest(site_id="VIEW-1"), metadata=bearer(viewer), timeout=10)
    assert got.site_id == "VIEW-1"
    listed = sites.ListSites(pb.ListSitesRequest(), metadata=bearer(viewer), timeout=10)
    assert [s.site_id for s in listed.sites] == ["VIEW-1"]
    request = pb.CreateSiteRequest(site_id="VIEW-2", site=pb.Site(name="Viewer's"))
    error = expect_error(sites.CreateSite, request, metadata=bearer(viewer))
    assert error.code == grpc.StatusCode.PERMISSION_DENIED, error
    assert error.reason == "PERMISSION_MISSING"
    assert_no_site(sites, token(tenant_a), "VIEW-2")


def test_empty_permissions_cannot_read(sites, token, tenant_pair):
    tenant_a, _ = tenant_pair
    create_site(sites, token(tenant_a), "EMPTY-1")
    nobody = bearer(token(tenant_a, permissions=[]))
    for method, request in (
        (sites.GetSite, pb.GetSiteRequest(site_id="EMPTY-1")),
        (sites.ListSites, pb.ListSitesRequest()),
    ):
        error = expect_error(method, request, metadata=nobody)
        assert error.code == grpc.StatusCode.PERMISSION_DENIED, error
        assert error.reason == "PERMISSION_MISSING"
        assert error.info is not None
        assert dict(error.info.metadata) == {"permission": "sites.read"}


# --- the verified-token cache ------------------------------------------------------------------


def test_reused_tokens_keep_working_and_stay_apart(sites, token, tenant_pair):
    # Both tokens are served from the cache after their first use; each must keep
    # resolving to its own tenant.
    tenant_a, tenant_b = tenant_pair
    token_a, token_b = token(tenant_a), token(tenant_b)
    create_site(sites, token_a, "CACHE-A")
    create_site(sites, token_b, "CACHE-B")
    for _ in range(25):
        for tok, tenant, own in ((token_a, tenant_a, "CACHE-A"), (token_b, tenant_b, "CACHE-B")):
            listed = sites.ListSites(pb.ListSitesRequest(), metadata=bearer(tok), timeout=10)
            assert [(s.tenant_id, s.site_id) for s in listed.sites] == [(tenant, own)]


class CountingKeySet(KeySet):
    def __init__(self, config: VerifierConfig) -> None:
        super().__init__(config)
        self.lookups = 0

    def key_for(self, kid: str) -> Any:
        self.lookups += 1
        return super().key_for(kid)


def test_verifier_caches_a_token_until_it_expires(stack, sign, tenant_pair):
    tenant, _ = tenant_pair
    config = VerifierConfig(
        issuer=DEFAULT_JWT_ISSUER,
        audience=DEFAULT_JWT_AUDIENCE,
        leeway_seconds=0,
        jwks_file=str(stack.keys_dir / "jwks.json"),
    )
    keys = CountingKeySet(config)
    verifier = TokenVerifier(config, keys)
    exp = int(time.time()) + 2
    short_lived = sign(claims_for(tenant, exp=exp))

    for _ in range(20):
        assert verifier.verify(short_lived).tenant_id == tenant
    assert keys.lookups == 1  # verified once, then served from the cache
    assert verifier.verify_cached(short_lived).subject == f"hand-made@{tenant}"

    time.sleep(max(0.0, exp - time.time()) + 1.0)  # wait until the token has expired
    with pytest.raises(KeyError):
        verifier.verify_cached(short_lived)  # the cache no longer vouches for it
    with pytest.raises(TokenError) as refused:
        verifier.verify(short_lived)
    assert refused.value.reason == "TOKEN_EXPIRED"


# --- the start-up guard ----------------------------------------------------------------------


def _service_descriptor(
    name: str, policies: dict[str, policy_pb2.MethodPolicy | None], *, streaming: frozenset[str] = frozenset()
) -> Any:
    """A service ``test.guard.<name>`` with one Empty->Empty method per entry of ``policies``."""
    file = descriptor_pb2.FileDescriptorProto(
        name=f"test/guard/{name.lower()}.proto",
        package="test.guard",
        syntax="proto3",
        dependency=["google/protobuf/empty.proto"],
    )
    service = file.service.add(name=name)
    for method_name, declared in policies.items():
        method = service.method.add(
            name=method_name,
            input_type=".google.protobuf.Empty",
            output_type=".google.protobuf.Empty",
            server_streaming=method_name in streaming,
        )
        if declared is not None:
            method.options.Extensions[policy_pb2.policy].CopyFrom(declared)
    pool = descriptor_pool.DescriptorPool()
    empty = descriptor_pb2.FileDescriptorProto()
    descriptor_pool.Default().FindFileByName("google/protobuf/empty.proto").CopyToProto(empty)
    pool.Add(empty)
    pool.Add(file)
    return pool.FindServiceByName(f"test.guard.{name}")


def test_policy_table_accepts_declared_methods():
    # Control for the guard below: the same construction with every policy declared works.
    read = policy_pb2.MethodPolicy(permission="things.read", rate_class=policy_pb2.RATE_CLASS_READ)
    public = policy_pb2.MethodPolicy(public=True)
    table = PolicyTable.from_services([_service_descriptor("Declared", {"Read": read, "Hello": public})])
    policy = table.get("/test.guard.Declared/Read")
    assert policy is not None and policy.permission == "things.read" and not policy.write
    assert "/test.guard.Declared/Hello" in table


def test_policy_table_covers_every_site_service_rpc():
    service = pb.DESCRIPTOR.services_by_name["SiteService"]
    table = PolicyTable.from_services([service])
    for method in service.methods:
        policy = table.get(f"/{service.full_name}/{method.name}")
        assert policy is not None and policy.permission.startswith("sites.")
        assert not policy.public and not policy.cross_tenant


def test_rpc_without_policy_is_a_startup_error():
    read = policy_pb2.MethodPolicy(permission="things.read")
    service = _service_descriptor("Undeclared", {"Read": read, "Forgotten": None})
    with pytest.raises(PolicyError, match=re.escape("/test.guard.Undeclared/Forgotten")) as failure:
        PolicyTable.from_services([service])
    assert "/test.guard.Undeclared/Read" not in str(failure.value)


def test_policy_without_permission_is_a_startup_error():
    service = _service_descriptor("Empty", {"Nothing": policy_pb2.MethodPolicy(rate_class=policy_pb2.RATE_CLASS_READ)})
    with pytest.raises(PolicyError, match=re.escape("/test.guard.Empty/Nothing")):
        PolicyTable.from_services([service])


def test_streaming_rpc_is_a_startup_error():
    # The chain only wraps unary calls; a streaming RPC would slip past it, so it cannot start.
    read = policy_pb2.MethodPolicy(permission="things.read")
    service = _service_descriptor("Streams", {"Watch": read}, streaming=frozenset({"Watch"}))
    with pytest.raises(PolicyError, match="streaming"):
        PolicyTable.from_services([service])


# --- what stays reachable without a token ---------------------------------------------------------


def test_health_needs_no_token(sites_target):
    with grpc.insecure_channel(sites_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", DOMAIN):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_needs_no_token(sites_target):
    with grpc.insecure_channel(sites_target) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(
            reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
        )
    names = {s.name for s in replies[0].list_services_response.service}
    assert DOMAIN in names
    assert "grpc.health.v1.Health" in names
