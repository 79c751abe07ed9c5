"""Per-tenant single sign-on: a tenant's own OIDC issuer, its keys and its tokens.

The identity provider is a real HTTP server on loopback (tests/support/oidc_provider.py)
with its own RSA keys; the verifier fetches its discovery document and JWKS as it would
a tenant's provider over HTTPS.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from towerco.audit.v1 import audit_log_service_pb2 as audit_pb
from towerco.features.v1 import feature_gate_service_pb2 as features_pb
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc
from towerco.tenant.v1 import sso_config_service_pb2 as sso_pb
from towerco.tenant.v1 import sso_config_service_pb2_grpc as sso_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb
from towerco.tenant.v1 import user_service_pb2 as users_pb
from towerco.tenant.v1 import user_service_pb2_grpc as users_grpc

from services.runtime.auth import ProviderUnavailableError, TenantIssuer, TokenError, TokenVerifier, VerifierConfig
from services.runtime.context import Caller
from services.runtime.errors import ServiceError
from services.runtime.identity import ServiceIdentity
from services.runtime.oidc import ProviderDirectory, ProviderError, ProviderKeys, ProviderLimits, check_url
from services.runtime.roles import ROLE_PERMISSIONS
from services.runtime.settings import (
    DEFAULT_JWT_AUDIENCE,
    DEFAULT_JWT_ISSUER,
    DEFAULT_SERVICE_JWT_ISSUER,
    DEV_SERVICE_KEY_ID,
)
from services.runtime.sso_issuers import RegistrySsoSource, SsoIssuers

from .support import bearer, expect_error, free_port, rich_error
from .support.oidc_provider import TestIdentityProvider, serve_identity_provider
from .support.requests import set_limit

# Every test here talks to a server: the test identity provider (HTTP on loopback, in this
# process), and most to the stack too.
pytestmark = pytest.mark.stack

AUDIENCE = "towerco-sso-test"
GROUPS = (("noc-admins", "admin"), ("noc", "operator"), ("everyone", "viewer"))


@pytest.fixture
def idp():
    with serve_identity_provider() as provider:
        yield provider


class Issuers:
    """The SSO configurations a verifier sees (the registry's, in a service), changeable by the test."""

    def __init__(self) -> None:
        self.by_issuer: dict[str, TenantIssuer] = {}

    def configure(self, tenant: str, provider: TestIdentityProvider, **overrides: object) -> TenantIssuer:
        fields: dict[str, object] = {"audience": AUDIENCE, "group_roles": GROUPS, **overrides}
        config = TenantIssuer(tenant_id=tenant, issuer=provider.issuer, **fields)  # type: ignore[arg-type]
        self.by_issuer[provider.issuer] = config
        return config

    def __call__(self, issuer: str) -> TenantIssuer | None:
        return self.by_issuer.get(issuer)

    async def prepare(self, token: str, issuer: str | None = None) -> None:
        """Nothing to fetch: the test changes ``by_issuer`` itself."""

    async def sign_in(self, caller: Caller, issuer: TenantIssuer) -> Caller:
        return caller


def verifier_with(issuers: Issuers, limits: ProviderLimits | None = None) -> TokenVerifier:
    platform = VerifierConfig(issuer=DEFAULT_JWT_ISSUER, audience=DEFAULT_JWT_AUDIENCE, leeway_seconds=0)
    return TokenVerifier(platform, tenant_issuers=issuers, providers=ProviderDirectory(limits))


def configured_for_x(idp: TestIdentityProvider, **overrides: object) -> tuple[Issuers, TokenVerifier]:
    """A verifier to which ``idp`` is tenant-x's issuer, and the configurations it sees."""
    issuers = Issuers()
    issuers.configure("tenant-x", idp, **overrides)
    return issuers, verifier_with(issuers)


def refused(verifier: TokenVerifier, token: str) -> TokenError:
    with pytest.raises(TokenError) as caught:
        verifier.verify(token)
    return caught.value


def test_tenant_issuer_token_is_its_tenants_whatever_the_claims_say(idp):
    _, verifier = configured_for_x(idp)

    caller = verifier.verify(
        idp.token(AUDIENCE, email="Ana@Example.COM", groups=["noc"], tenant_id="tenant-y", role="platform_admin")
    )

    assert caller.tenant_id == "tenant-x"  # from the issuer mapping, not the claim
    assert caller.subject == "ana@example.com"
    assert caller.role == "operator"
    assert caller.permissions == frozenset(ROLE_PERMISSIONS["operator"])
    assert not caller.service and not caller.is_platform


def test_role_comes_from_the_groups_on_every_sign_in(idp):
    _, verifier = configured_for_x(idp)

    first = verifier.verify(idp.token(AUDIENCE, email="bo@example.com", groups=["everyone"]))
    promoted = verifier.verify(idp.token(AUDIENCE, email="bo@example.com", groups=["everyone", "noc-admins"]))

    assert first.role == "viewer"
    assert promoted.role == "admin"  # the mapping's first group the token carries
    assert refused(verifier, idp.token(AUDIENCE, email="bo@example.com", groups=["visitors"])).reason == (
        "TOKEN_INVALID"
    )


def test_issuer_configured_for_nobody_is_refused(idp):
    verifier = verifier_with(Issuers())

    error = refused(verifier, idp.token(AUDIENCE, email="eve@example.com", groups=["noc"]))

    assert error.reason == "TOKEN_INVALID"
    assert "not accepted" in str(error)
    assert idp.requests == []  # nothing fetched for an issuer nobody configured


def test_tenant_tokens_meet_the_platforms_rejection_catalogue(idp):
    _, verifier = configured_for_x(idp)
    claims = {"email": "cy@example.com", "groups": ["noc"]}

    assert refused(verifier, idp.token(AUDIENCE, ttl=-60, **claims)).reason == "TOKEN_EXPIRED"
    assert "audience" in str(refused(verifier, idp.token("someone-else", **claims)))
    assert "unknown signing key" in str(refused(verifier, idp.token(AUDIENCE, kid="never-published", **claims)))
    signed = idp.token(AUDIENCE, **claims)
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "kid": idp.kid}).encode()).rstrip(b"=").decode()
    unsigned = f"{header}.{signed.split('.')[1]}."  # the same claims, alg none, no signature
    assert "'none' is not allowed" in str(refused(verifier, unsigned))
    assert "email" in str(refused(verifier, idp.token(AUDIENCE, groups=["noc"])))


def test_a_provider_cannot_make_platform_admins(idp):
    _, verifier = configured_for_x(idp, group_roles=(("root", "platform_admin"),))

    error = refused(verifier, idp.token(AUDIENCE, email="mallory@example.com", groups=["root"]))

    assert "cannot be given" in str(error)


def test_removing_the_configuration_stops_a_verified_token(idp):
    issuers, verifier = configured_for_x(idp)
    token = idp.token(AUDIENCE, email="dee@example.com", groups=["noc"])
    assert verifier.verify(token).tenant_id == "tenant-x"

    del issuers.by_issuer[idp.issuer]

    with pytest.raises(KeyError):
        verifier.verify_cached(token)  # the cache no longer vouches for it
    assert "not accepted" in str(refused(verifier, token))


def test_moving_the_issuer_to_another_tenant_moves_its_cached_tokens(idp):
    issuers, verifier = configured_for_x(idp)
    token = idp.token(AUDIENCE, email="dee@example.com", groups=["noc"])
    assert verifier.verify(token).tenant_id == "tenant-x"

    issuers.configure("tenant-z", idp)

    assert verifier.verify(token).tenant_id == "tenant-z"


def test_unknown_key_id_refreshes_the_keys_at_most_once_per_floor(idp):
    issuers = Issuers()
    issuers.configure("tenant-x", idp)
    verifier = verifier_with(issuers, ProviderLimits(refresh_floor_seconds=1.5))
    claims = {"email": "fay@example.com", "groups": ["noc"]}
    verifier.verify(idp.token(AUDIENCE, **claims))
    assert idp.requests.count("/idp/jwks") == 1

    time.sleep(1.6)
    for attempt in range(20):  # made-up key ids: one fetch, then the floor holds
        refused(verifier, idp.token(AUDIENCE, kid=f"bogus-{attempt}", **claims))
    assert idp.requests.count("/idp/jwks") == 2

    rotated = idp.rotate()  # the provider rotates: within the floor its new key is not asked for yet
    token = idp.token(AUDIENCE, kid=rotated, **claims)
    assert "unknown signing key" in str(refused(verifier, token))
    time.sleep(1.6)
    assert verifier.verify(token).tenant_id == "tenant-x"  # once the floor has passed, it is
    assert idp.requests.count("/idp/jwks") == 3


def test_a_provider_out_of_reach_is_unavailable_but_held_keys_still_verify():
    issuers = Issuers()
    verifier = verifier_with(issuers, ProviderLimits(refresh_floor_seconds=0))
    with serve_identity_provider() as provider:
        issuers.configure("tenant-x", provider)
        claims: dict[str, Any] = {"email": "gus@example.com", "groups": ["noc"]}
        assert verifier.verify(provider.token(AUDIENCE, **claims)).tenant_id == "tenant-x"  # keys now held
    rotated = provider.rotate()  # published where nobody can read it any more

    with pytest.raises(ProviderUnavailableError, match="cannot be read just now"):
        verifier.verify(provider.token(AUDIENCE, kid=rotated, **claims))
    held = provider.token(AUDIENCE, kid=next(iter(provider.keys)), **claims)
    assert verifier.verify(held).tenant_id == "tenant-x"


def test_a_tenant_token_is_unavailable_while_its_provider_is_out_of_reach(sso_stub, sites, new_tenant, token):
    x = new_tenant("su", plan="enterprise")
    with serve_identity_provider("/gone") as provider:
        configure(sso_stub, token(x), sso_config(provider))
    # Never read by the sites service, and now out of reach.

    error = expect_error(
        sites.ListSites, sites_pb.ListSitesRequest(),
        metadata=bearer(provider.token(AUDIENCE, email="hal@x.example", groups=["noc"])),
    )  # fmt: skip

    assert error.code == grpc.StatusCode.UNAVAILABLE and error.reason == "IDENTITY_PROVIDER_UNAVAILABLE", error
    assert error.retry is not None


async def test_a_registry_out_of_reach_is_unavailable_not_internal(stack):
    identity = ServiceIdentity.from_file(
        "sites", issuer=DEFAULT_SERVICE_JWT_ISSUER, audience=DEFAULT_JWT_AUDIENCE,
        key_file=str(stack.keys_dir / "service-signing-key.pem"), kid=DEV_SERVICE_KEY_ID,
    )  # fmt: skip
    registry = RegistrySsoSource(f"127.0.0.1:{free_port()}", identity, timeout=1.0)  # nobody listens
    issuers = SsoIssuers(
        frozenset({DEFAULT_JWT_ISSUER}), None, registry.by_issuer, registry.of_tenant, registry.sign_in, None,  # type: ignore[arg-type]
    )  # fmt: skip
    try:
        with serve_identity_provider() as provider:
            token = provider.token(AUDIENCE, email="ida@example.com", groups=["noc"])
        with pytest.raises(ServiceError) as refused:
            await issuers.prepare(token)
    finally:
        await registry.close()

    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert refused.value.reason == "TENANT_DIRECTORY_UNAVAILABLE"


def test_keys_are_fetched_over_https_or_from_loopback_only():
    assert check_url("https://login.example.com/o/1") == "https://login.example.com/o/1"
    assert check_url("http://127.0.0.1:8080/idp")
    assert check_url("http://[::1]:8080/idp")
    for url in ("http://login.example.com/o/1", "http://10.0.0.5/idp", "file:///etc/passwd", "ftp://x/y"):
        with pytest.raises(ProviderError, match="https"):
            check_url(url)


def test_discovery_naming_another_issuer_is_refused(idp):
    keys = ProviderKeys(idp.issuer + "/")  # another spelling than the one discovery names

    with pytest.raises(ProviderError, match="names issuer"):
        keys.key_for(idp.kid)


def test_oversized_jwks_is_refused(idp):
    for _ in range(3):
        idp.rotate()
    keys = ProviderKeys(idp.issuer, ProviderLimits(max_bytes=1000))

    with pytest.raises(ProviderError, match="more than 1000 bytes"):
        keys.key_for(idp.kid)


# --- against the stack: the registry's configuration, every service honouring it ---------------


@pytest.fixture
def sso_stub(tenant_target: str) -> Iterator[sso_grpc.SsoConfigServiceStub]:
    with grpc.insecure_channel(tenant_target) as channel:
        yield sso_grpc.SsoConfigServiceStub(channel)


def sso_config(provider: TestIdentityProvider, **overrides: Any) -> sso_pb.SsoConfig:
    fields: dict[str, Any] = {
        "issuer": provider.issuer,
        "audience": AUDIENCE,
        "group_roles": [sso_pb.GroupRole(group=group, role=role) for group, role in GROUPS],
        **overrides,
    }
    return sso_pb.SsoConfig(**fields)


def configure(stub: sso_grpc.SsoConfigServiceStub, admin: str, config: sso_pb.SsoConfig) -> sso_pb.SsoConfig:
    request = sso_pb.UpdateSsoConfigRequest(sso_config=config)
    reply: sso_pb.SsoConfig = stub.UpdateSsoConfig(request, metadata=bearer(admin), timeout=10)
    return reply


def list_sites(sites: Any, jwt_: str, tenant: str | None = None) -> None:
    sites.ListSites(sites_pb.ListSitesRequest(), metadata=bearer(jwt_, tenant), timeout=10)


def test_configuration_is_refused_without_sso_in_the_plan(sso_stub, new_tenant, token, idp):
    tenant = new_tenant("sp", plan="professional")

    error = expect_error(
        sso_stub.UpdateSsoConfig, sso_pb.UpdateSsoConfigRequest(sso_config=sso_config(idp)),
        metadata=bearer(token(tenant)),
    )  # fmt: skip

    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.reason == "FEATURE_NOT_IN_PLAN"
    assert error.info is not None and error.info.metadata["feature"] == "sso"


def test_a_bad_configuration_names_each_bad_field(sso_stub, new_tenant, token, idp):
    tenant = new_tenant("sb", plan="enterprise")
    config = sso_config(idp, issuer="http://login.example.com/realms/noc",
                        group_roles=[sso_pb.GroupRole(group="noc", role="platform_admin")])  # fmt: skip

    error = expect_error(
        sso_stub.UpdateSsoConfig, sso_pb.UpdateSsoConfigRequest(sso_config=config), metadata=bearer(token(tenant))
    )

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.bad_request is not None
    fields = {v.field for v in error.bad_request.field_violations}
    assert fields == {"sso_config.issuer", "sso_config.group_roles[0].role"}


def test_tenant_tokens_work_for_their_tenant_only(sso_stub, sites, new_tenant, token, idp, eventually):
    x, y = new_tenant("sx", plan="enterprise"), new_tenant("sy", plan="enterprise")
    stored = configure(sso_stub, token(x), sso_config(idp))
    assert stored.tenant_id == x and stored.email_claim == "email" and stored.groups_claim == "groups"
    signed_in = idp.token(AUDIENCE, email="ana@x.example", groups=["noc"], tenant_id=y)

    list_sites(sites, signed_in)  # its tenant is x: the issuer's, not the claim's
    list_sites(sites, signed_in, x)

    across = expect_error(sites.ListSites, sites_pb.ListSitesRequest(), metadata=bearer(signed_in, y))
    assert across.code == grpc.StatusCode.PERMISSION_DENIED
    with serve_identity_provider("/nobody") as stranger:
        unknown = expect_error(
            sites.ListSites, sites_pb.ListSitesRequest(),
            metadata=bearer(stranger.token(AUDIENCE, email="eve@x.example", groups=["noc"], tenant_id=x)),
        )  # fmt: skip
    assert unknown.code == grpc.StatusCode.UNAUTHENTICATED and unknown.reason == "TOKEN_INVALID"
    wrong_audience = expect_error(
        sites.ListSites, sites_pb.ListSitesRequest(),
        metadata=bearer(idp.token("other-app", email="ana@x.example", groups=["noc"])),
    )  # fmt: skip
    assert wrong_audience.code == grpc.StatusCode.UNAUTHENTICATED
    # The registry serves x's users too: a viewer reads the configuration, cannot change it.
    viewer = idp.token(AUDIENCE, email="vi@x.example", groups=["everyone"])
    assert sso_stub.GetSsoConfig(sso_pb.GetSsoConfigRequest(), metadata=bearer(viewer), timeout=10).issuer == idp.issuer
    denied = expect_error(sso_stub.DeleteSsoConfig, sso_pb.DeleteSsoConfigRequest(), metadata=bearer(viewer))
    assert denied.code == grpc.StatusCode.PERMISSION_DENIED


def test_every_service_serves_a_tenant_token(sso_stub, sites, features, audit, registry, new_tenant, token, idp):
    x = new_tenant("se", plan="enterprise")
    configure(sso_stub, token(x), sso_config(idp))
    md = bearer(idp.token(AUDIENCE, email="fay@x.example", groups=["noc-admins"]))

    sites.ListSites(sites_pb.ListSitesRequest(), metadata=md, timeout=10)
    assert features.GetEntitlements(features_pb.GetEntitlementsRequest(), metadata=md, timeout=10).tenant_id == x
    audit.ListEvents(audit_pb.ListEventsRequest(page_size=1), metadata=md, timeout=10)
    assert registry.GetTenant(tenant_pb.GetTenantRequest(), metadata=md, timeout=10).tenant_id == x


def test_one_issuer_belongs_to_one_tenant(sso_stub, new_tenant, token, idp):
    x, y = new_tenant("so", plan="enterprise"), new_tenant("so", plan="enterprise")
    configure(sso_stub, token(x), sso_config(idp))

    error = expect_error(
        sso_stub.UpdateSsoConfig, sso_pb.UpdateSsoConfigRequest(sso_config=sso_config(idp)), metadata=bearer(token(y))
    )

    assert error.code == grpc.StatusCode.ALREADY_EXISTS and error.reason == "SSO_ISSUER_ALREADY_EXISTS"


def test_removing_the_configuration_stops_its_tokens_within_a_second(
    sso_stub, sites, new_tenant, token, idp, eventually
):
    x = new_tenant("sr", plan="enterprise")
    configure(sso_stub, token(x), sso_config(idp))
    signed_in = idp.token(AUDIENCE, email="bo@x.example", groups=["noc-admins"])
    list_sites(sites, signed_in)  # verified and cached in the sites process

    sso_stub.DeleteSsoConfig(sso_pb.DeleteSsoConfigRequest(), metadata=bearer(token(x)), timeout=10)

    def refused() -> None:
        error = expect_error(sites.ListSites, sites_pb.ListSitesRequest(), metadata=bearer(signed_in))
        assert error.code == grpc.StatusCode.UNAUTHENTICATED, error

    eventually(refused, within=1.0)
    gone = expect_error(sso_stub.GetSsoConfig, sso_pb.GetSsoConfigRequest(), metadata=bearer(token(x)))
    assert gone.code == grpc.StatusCode.NOT_FOUND and gone.reason == "SSO_CONFIG_NOT_FOUND"


def test_a_downgraded_tenants_configuration_is_not_honoured(
    sso_stub, sites, features, new_tenant, token, platform_token, idp, eventually
):
    x = new_tenant("sd", plan="enterprise")
    configure(sso_stub, token(x), sso_config(idp))
    signed_in = idp.token(AUDIENCE, email="cy@x.example", groups=["noc"])
    list_sites(sites, signed_in)

    features.SetTenantPlan(
        features_pb.SetTenantPlanRequest(tenant_id=x, plan="professional"), metadata=bearer(platform_token),
        timeout=10,
    )  # fmt: skip

    def refused() -> None:
        error = expect_error(sites.ListSites, sites_pb.ListSitesRequest(), metadata=bearer(signed_in))
        assert error.code == grpc.StatusCode.UNAUTHENTICATED, error

    eventually(refused, within=2.0)


async def test_every_change_is_audited_without_secrets(sso_stub, new_tenant, token, idp, admin):
    x = new_tenant("sa", plan="enterprise")
    configure(sso_stub, token(x), sso_config(idp))
    sso_stub.DeleteSsoConfig(sso_pb.DeleteSsoConfigRequest(), metadata=bearer(token(x)), timeout=10)

    deadline = time.monotonic() + 15
    while True:
        rows = await admin.fetch(
            "SELECT action, details FROM audit.events WHERE tenant_id = $1 AND action LIKE 'sso.%' ORDER BY sequence",
            x,
        )
        if len(rows) >= 2 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)

    assert [row["action"] for row in rows] == ["sso.update", "sso.delete"]
    update = json.loads(rows[0]["details"]) if isinstance(rows[0]["details"], str) else rows[0]["details"]
    assert update["issuer"] == idp.issuer and update["audience"] == AUDIENCE
    assert "key" not in json.dumps(update).lower() and "secret" not in json.dumps(update).lower()


# --- just-in-time users -----------------------------------------------------------------------


@pytest.fixture
def users(tenant_target: str) -> Iterator[users_grpc.UserServiceStub]:
    with grpc.insecure_channel(tenant_target) as channel:
        yield users_grpc.UserServiceStub(channel)


def users_of(users: Any, admin: str) -> dict[str, users_pb.User]:
    listed = users.ListUsers(users_pb.ListUsersRequest(page_size=100), metadata=bearer(admin), timeout=10).users
    return {user.email: user for user in listed}


def test_first_sign_in_creates_the_user_and_groups_give_its_role_each_time(
    sso_stub, sites, users, new_tenant, token, idp
):
    x = new_tenant("sj", plan="enterprise")
    admin = token(x)
    configure(sso_stub, admin, sso_config(idp))
    assert "dana@x.example" not in users_of(users, admin)

    list_sites(sites, idp.token(AUDIENCE, email="Dana@X.example", groups=["everyone"]))
    first = users_of(users, admin)["dana@x.example"]
    assert first.role == "viewer" and first.user_id.startswith("user-")

    list_sites(sites, idp.token(AUDIENCE, email="dana@x.example", groups=["noc"]))  # the next sign-in
    again = users_of(users, admin)["dana@x.example"]
    assert (again.user_id, again.role) == (first.user_id, "operator")


def test_a_deactivated_sso_user_is_refused_though_its_token_is_valid(sso_stub, sites, users, new_tenant, token, idp):
    x = new_tenant("sv", plan="enterprise")
    admin = token(x)
    configure(sso_stub, admin, sso_config(idp))
    signed_in = idp.token(AUDIENCE, email="eli@x.example", groups=["noc"])
    list_sites(sites, signed_in)
    user_id = users_of(users, admin)["eli@x.example"].user_id

    users.DeactivateUser(users_pb.DeactivateUserRequest(user_id=user_id), metadata=bearer(admin), timeout=10)

    refused = expect_error(sites.ListSites, sites_pb.ListSitesRequest(), metadata=bearer(signed_in))
    assert refused.code == grpc.StatusCode.PERMISSION_DENIED and refused.reason == "USER_DEACTIVATED"


def test_at_max_users_a_new_sso_user_is_refused_and_nothing_is_created(
    sso_stub, sites, users, features, new_tenant, token, platform_token, idp
):
    x = new_tenant("sq", plan="enterprise")  # holds its administrator
    admin = token(x)
    configure(sso_stub, admin, sso_config(idp))
    set_limit(features, platform_token, x, "max_users", 2)
    tokens = [idp.token(AUDIENCE, email=f"seat{n}@x.example", groups=["noc"]) for n in range(10)]

    def sign_in(jwt_: str) -> str:
        try:
            list_sites(sites, jwt_)
            return "OK"
        except grpc.RpcError as exc:
            return rich_error(exc).reason

    with ThreadPoolExecutor(10) as pool:
        outcomes = list(pool.map(sign_in, tokens))

    assert sorted(outcomes) == ["OK"] + ["QUOTA_EXCEEDED"] * 9, outcomes
    assert len(users_of(users, admin)) == 2  # the administrator and the one signed in
    late = expect_error(
        sites.ListSites, sites_pb.ListSitesRequest(),
        metadata=bearer(idp.token(AUDIENCE, email="late@x.example", groups=["noc"])),
    )  # fmt: skip
    assert late.code == grpc.StatusCode.RESOURCE_EXHAUSTED and late.reason == "QUOTA_EXCEEDED"
    assert late.info is not None and late.info.metadata["resource"] == "max_users"


def test_a_group_may_give_a_custom_role_and_only_its_permissions(sso_stub, sites, users, new_tenant, token, idp):
    x = new_tenant("sc", plan="enterprise")
    admin = token(x)
    mapping = [sso_pb.GroupRole(group="readers", role="noc-reader")]
    unknown = expect_error(
        sso_stub.UpdateSsoConfig, sso_pb.UpdateSsoConfigRequest(sso_config=sso_config(idp, group_roles=mapping)),
        metadata=bearer(admin),
    )  # fmt: skip
    assert unknown.code == grpc.StatusCode.INVALID_ARGUMENT, unknown  # the custom role does not exist yet
    role = users_pb.Role(role_id="noc-reader", permissions=["sites.read"])
    users.CreateRole(users_pb.CreateRoleRequest(role=role), metadata=bearer(admin), timeout=10)
    configure(sso_stub, admin, sso_config(idp, group_roles=mapping))
    reader = idp.token(AUDIENCE, email="rea@x.example", groups=["readers"])

    list_sites(sites, reader)
    write = expect_error(
        sites.CreateSite, sites_pb.CreateSiteRequest(site_id="s-1", site=sites_pb.Site(name="Mast 1")),
        metadata=bearer(reader),
    )  # fmt: skip

    assert write.code == grpc.StatusCode.PERMISSION_DENIED, write
    assert users_of(users, admin)["rea@x.example"].role == "noc-reader"


# --- through the gateway ---------------------------------------------------------------------


def test_tenant_tokens_work_through_the_gateway_for_their_tenant_only(gateway, sso_stub, new_tenant, token, idp):
    x, y = new_tenant("sg", plan="enterprise"), new_tenant("sg", plan="enterprise")
    configure(sso_stub, token(x), sso_config(idp))
    signed_in = idp.token(AUDIENCE, email="gil@x.example", groups=["noc"], tenant_id=y)

    def edge(tenant: str) -> Any:
        options = [("grpc.default_authority", f"{tenant}.localhost")]
        return grpc.insecure_channel(f"127.0.0.1:{gateway.port}", options=options)

    with edge(x) as on_x, edge(y) as on_y:
        sites_grpc.SiteServiceStub(on_x).ListSites(sites_pb.ListSitesRequest(), metadata=bearer(signed_in), timeout=10)
        across = expect_error(
            sites_grpc.SiteServiceStub(on_y).ListSites, sites_pb.ListSitesRequest(), metadata=bearer(signed_in)
        )
        with serve_identity_provider("/nobody") as stranger:
            unknown = expect_error(
                sites_grpc.SiteServiceStub(on_x).ListSites, sites_pb.ListSitesRequest(),
                metadata=bearer(stranger.token(AUDIENCE, email="eve@x.example", groups=["noc"])),
            )  # fmt: skip
        # A client cannot mark a platform-issuer token as a tenant's to get it past jwt_authn.
        forged = expect_error(
            sites_grpc.SiteServiceStub(on_x).ListSites, sites_pb.ListSitesRequest(),
            metadata=(*bearer(token(x, ttl=-120)), ("x-towerco-tenant-issuer", "1")),
        )  # fmt: skip

    assert across.code == grpc.StatusCode.PERMISSION_DENIED, across
    assert unknown.code == grpc.StatusCode.UNAUTHENTICATED and "not accepted" in unknown.message, unknown
    # Refused by the gateway's jwt_authn (its message), not let through to the service.
    assert forged.code == grpc.StatusCode.UNAUTHENTICATED and "sign in again" in forged.message, forged
