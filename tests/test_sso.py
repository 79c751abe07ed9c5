"""Per-tenant single sign-on: a tenant's own OIDC issuer, its keys and its tokens.

The identity provider is a real HTTP server on loopback (tests/support/oidc_provider.py)
with its own RSA keys; the verifier fetches its discovery document and JWKS as it would
a tenant's provider over HTTPS.
"""

from __future__ import annotations

import base64
import json
import time

import pytest

from services.runtime.auth import TenantIssuer, TokenError, TokenVerifier, VerifierConfig
from services.runtime.oidc import ProviderDirectory, ProviderError, ProviderKeys, ProviderLimits, check_url
from services.runtime.roles import ROLE_PERMISSIONS
from services.runtime.settings import DEFAULT_JWT_AUDIENCE, DEFAULT_JWT_ISSUER

from .support.oidc_provider import TestIdentityProvider, serve_identity_provider

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


def verifier_with(issuers: Issuers, limits: ProviderLimits | None = None) -> TokenVerifier:
    platform = VerifierConfig(issuer=DEFAULT_JWT_ISSUER, audience=DEFAULT_JWT_AUDIENCE, leeway_seconds=0)
    return TokenVerifier(platform, tenant_issuers=issuers, providers=ProviderDirectory(limits))


def refused(verifier: TokenVerifier, token: str) -> TokenError:
    with pytest.raises(TokenError) as caught:
        verifier.verify(token)
    return caught.value


def test_tenant_issuer_token_is_its_tenants_whatever_the_claims_say(idp):
    issuers = Issuers()
    issuers.configure("tenant-x", idp)
    verifier = verifier_with(issuers)

    caller = verifier.verify(
        idp.token(AUDIENCE, email="Ana@Example.COM", groups=["noc"], tenant_id="tenant-y", role="platform_admin")
    )

    assert caller.tenant_id == "tenant-x"  # from the issuer mapping, not the claim
    assert caller.subject == "ana@example.com"
    assert caller.role == "operator"
    assert caller.permissions == frozenset(ROLE_PERMISSIONS["operator"])
    assert not caller.service and not caller.is_platform


def test_role_comes_from_the_groups_on_every_sign_in(idp):
    issuers = Issuers()
    issuers.configure("tenant-x", idp)
    verifier = verifier_with(issuers)

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
    issuers = Issuers()
    issuers.configure("tenant-x", idp)
    verifier = verifier_with(issuers)
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
    issuers = Issuers()
    issuers.configure("tenant-x", idp, group_roles=(("root", "platform_admin"),))
    verifier = verifier_with(issuers)

    error = refused(verifier, idp.token(AUDIENCE, email="mallory@example.com", groups=["root"]))

    assert "cannot be given" in str(error)


def test_removing_the_configuration_stops_a_verified_token(idp):
    issuers = Issuers()
    issuers.configure("tenant-x", idp)
    verifier = verifier_with(issuers)
    token = idp.token(AUDIENCE, email="dee@example.com", groups=["noc"])
    assert verifier.verify(token).tenant_id == "tenant-x"

    del issuers.by_issuer[idp.issuer]

    with pytest.raises(KeyError):
        verifier.verify_cached(token)  # the cache no longer vouches for it
    assert "not accepted" in str(refused(verifier, token))


def test_moving_the_issuer_to_another_tenant_moves_its_cached_tokens(idp):
    issuers = Issuers()
    issuers.configure("tenant-x", idp)
    verifier = verifier_with(issuers)
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
