"""JWT verification against a JWKS: pinned issuer and audience, an algorithm allow-list.

Two issuers are trusted, each with its own keys: the identity provider that signs
end users' tokens, and the platform's service issuer that signs the tokens services
present to each other. A token is checked only against the keys of the issuer it
names, and only the service issuer's tokens make a :class:`Caller` a service.

Besides them, a tenant with single sign-on has its own issuer (:class:`TenantIssuer`,
looked up by the token's ``iss``): its tokens are checked against that provider's keys
(:mod:`.oidc`), and their tenant is the one the issuer is configured for, never a claim
the provider writes; the role comes from the token's groups through the tenant's mapping.

Verified tokens are cached by their exact text until they expire, so a token seen again
costs a dictionary lookup, not an RSA verification.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any, Protocol

import jwt
from jwt import PyJWK, PyJWKClient

from . import error_catalogue
from .context import PLATFORM_ADMIN_ROLE, PLATFORM_TENANT, Caller, is_valid_tenant_id
from .errors import ErrorReason, Reason
from .oidc import ProviderDirectory, ProviderError
from .roles import ROLE_PERMISSIONS

#: Service tokens name their service as ``service:<name>``.
SERVICE_SUBJECT_PREFIX = "service:"

#: Algorithms a token may be signed with. Never `none`, never a symmetric HS*.
ALLOWED_ALGORITHMS = ("RS256", "ES256")
#: Larger tokens are refused before any parsing.
MAX_TOKEN_BYTES = 8192


class TokenError(Exception):
    """The token is not acceptable; ``reason`` is the ErrorInfo reason sent back (its name)."""

    def __init__(self, message: str, reason: Reason = ErrorReason.TOKEN_INVALID) -> None:
        super().__init__(message)
        self.reason = error_catalogue.name(reason)


class ProviderUnavailableError(Exception):
    """A tenant's identity provider cannot be read and the token needs a key not held: retry later."""


@dataclass(frozen=True)
class VerifierConfig:
    issuer: str
    audience: str
    leeway_seconds: int = 30
    jwks_file: str = ""
    jwks_url: str = ""
    cache_size: int = 10_000
    #: True for the platform's service issuer: its callers are services, not users.
    service: bool = False


@dataclass(frozen=True)
class TenantIssuer:
    """A tenant's own identity provider, as its SSO configuration declares it."""

    tenant_id: str
    issuer: str
    audience: str
    #: The claim holding the user's email, which names the user in the platform.
    email_claim: str = "email"
    groups_claim: str = "groups"
    #: (group, role) in the configuration's order: the first group the token carries gives the role.
    group_roles: tuple[tuple[str, str], ...] = ()

    def role_for(self, groups: object) -> str | None:
        if not isinstance(groups, list):
            return None
        held = {group for group in groups if isinstance(group, str)}
        return next((role for group, role in self.group_roles if group in held), None)


class TenantIssuers(Protocol):
    """The tenants' own issuers, as the verifier sees them (services/runtime/sso_issuers.py)."""

    def __call__(self, issuer: str) -> TenantIssuer | None:
        """The tenant issuer a token's ``iss`` names, if a tenant with SSO configured it (else None)."""

    async def prepare(self, token: str, issuer: str | None = None) -> None:
        """Bring what the token's issuer (``issuer`` if known, else read from it) stands for now
        into memory, before it is verified."""

    async def sign_in(self, caller: Caller, issuer: TenantIssuer) -> Caller:
        """The caller as the tenant's user (created on its first sign-in, its role from the groups)."""


class KeySet:
    """The verification keys by ``kid``, from a JWKS file or URL."""

    def __init__(self, config: VerifierConfig) -> None:
        self._client = PyJWKClient(config.jwks_url, cache_keys=True, lifespan=300) if config.jwks_url else None
        self._keys: dict[str, PyJWK] = {}
        if config.jwks_file:
            self._keys = load_jwks(json.loads(Path(config.jwks_file).read_text()))

    def key_for(self, kid: str) -> PyJWK:
        key = self._keys.get(kid)
        if key is not None:
            return key
        if self._client is not None:
            try:
                return self._client.get_signing_key(kid)
            except jwt.PyJWKClientError as exc:
                raise TokenError(f"unknown signing key {kid!r}") from exc
        raise TokenError(f"unknown signing key {kid!r}")


def load_jwks(document: Mapping[str, Any]) -> dict[str, PyJWK]:
    keys: dict[str, PyJWK] = {}
    for entry in document.get("keys", []):
        kid = entry.get("kid")
        if not kid or entry.get("use", "sig") != "sig":
            continue
        keys[kid] = PyJWK(entry)
    return keys


def bearer_token(header: str) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header; None for another scheme or no token."""
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class TokenVerifier:
    """Verifies bearer tokens and turns their claims into a :class:`Caller`."""

    def __init__(
        self,
        config: VerifierConfig,
        keys: KeySet | None = None,
        *,
        service: VerifierConfig | None = None,
        tenant_issuers: TenantIssuers | None = None,
        providers: ProviderDirectory | None = None,
    ) -> None:
        self._config = config
        self._tenant_issuers = tenant_issuers
        self.providers = providers or ProviderDirectory()
        self._issuers: dict[str, tuple[VerifierConfig, KeySet]] = {config.issuer: (config, keys or KeySet(config))}
        if service is not None:
            if service.issuer == config.issuer:
                raise ValueError("the service issuer must differ from the users' issuer")
            self._issuers[service.issuer] = (dataclass_replace(service, service=True), KeySet(service))
        #: token -> (caller, expiry, the tenant issuer that vouched for it if any)
        self._cache: OrderedDict[str, tuple[Caller, float, TenantIssuer | None]] = OrderedDict()

    async def prepare(self, token: str) -> None:
        """Before :meth:`verify`: the tenant issuers' current view of the token's issuer.

        A platform token verified before needs nothing (one dictionary lookup).
        """
        if self._tenant_issuers is None:
            return
        hit = self._cache.get(token)
        if hit is None:
            await self._tenant_issuers.prepare(token)
        elif hit[2] is not None:  # verified before: its issuer is known without decoding it again
            await self._tenant_issuers.prepare(token, hit[2].issuer)

    def verify_cached(self, token: str) -> Caller:
        """The caller of a token verified before and not yet expired; KeyError otherwise.

        A tenant issuer's token stays good only while its issuer's configuration is the
        same: removed or changed, the token is verified again (and refused if removed).
        """
        caller, expires, sso = self._cache[token]
        if time.time() >= expires + self._config.leeway_seconds or (
            sso is not None and (self._tenant_issuers is None or self._tenant_issuers(sso.issuer) != sso)
        ):
            self._cache.pop(token, None)
            raise KeyError(token)
        self._cache.move_to_end(token)
        return caller

    def verify(self, token: str) -> Caller:
        try:
            return self.verify_cached(token)
        except KeyError:
            pass
        caller, expires, sso = self._verify_uncached(token)
        self._remember(token, caller, expires, sso)
        return caller

    async def verify_signed_in(self, token: str) -> Caller:
        """:meth:`verify` for a call: the signature checked off the event loop, and a tenant
        issuer's user signed in (just in time) before its token is remembered."""
        caller, expires, sso = await asyncio.to_thread(self._verify_uncached, token)
        if sso is not None and self._tenant_issuers is not None:
            caller = await self._tenant_issuers.sign_in(caller, sso)
        self._remember(token, caller, expires, sso)
        return caller

    def _remember(self, token: str, caller: Caller, expires: float, sso: TenantIssuer | None) -> None:
        self._cache[token] = (caller, expires, sso)
        if len(self._cache) > self._config.cache_size:
            self._cache.popitem(last=False)

    def _verify_uncached(self, token: str) -> tuple[Caller, float, TenantIssuer | None]:
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenError("token is larger than 8 KiB")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise TokenError("token is malformed") from exc
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise TokenError(f"token algorithm {alg!r} is not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenError("token has no key id (kid)")
        sso = self._tenant_issuer_of(token)
        if sso is not None:
            return (*self._verify_tenant_token(token, sso, kid, alg), sso)
        config, keys = self._issuer_of(token)
        key = keys.key_for(kid)
        claims = _decode(token, key, kid, alg, config.audience, config.issuer, config.leeway_seconds)
        return _caller_from_claims(claims, token, service=config.service), float(claims["exp"]), None

    def _tenant_issuer_of(self, token: str) -> TenantIssuer | None:
        """The tenant issuer the token names, if it names none of the platform's own."""
        if self._tenant_issuers is None:
            return None
        issuer = _unverified_issuer(token)
        if not isinstance(issuer, str) or issuer in self._issuers:
            return None
        sso = self._tenant_issuers(issuer)
        if sso is None:
            raise TokenError(f"token issuer {issuer[:200]!r} is not accepted (no tenant signs in with it)")
        return sso

    def _verify_tenant_token(self, token: str, sso: TenantIssuer, kid: str, alg: str) -> tuple[Caller, float]:
        try:
            key = self.providers.keys_of(sso.issuer).key_for(kid)
        except ProviderError as exc:
            message = f"the identity provider {sso.issuer!r} cannot be read just now ({exc})"
            raise ProviderUnavailableError(message) from exc
        if key is None:
            raise TokenError(f"unknown signing key {kid!r}")
        claims = _decode(token, key, kid, alg, sso.audience, sso.issuer, self._config.leeway_seconds)
        return _caller_from_tenant_claims(claims, token, sso), float(claims["exp"])

    def _issuer_of(self, token: str) -> tuple[VerifierConfig, KeySet]:
        """The trusted issuer the token names (read before, and checked again by, verification)."""
        issuer = _unverified_issuer(token)
        if len(self._issuers) == 1 or issuer not in self._issuers:
            # One issuer, or an unknown one: let verification report the mismatch as usual.
            return self._config, self._issuers[self._config.issuer][1]
        return self._issuers[issuer]


def _unverified_issuer(token: str) -> object:
    try:
        return jwt.decode(token, options={"verify_signature": False}).get("iss")
    except jwt.PyJWTError as exc:
        raise TokenError("token is malformed") from exc


def _decode(token: str, key: PyJWK, kid: str, alg: str, audience: str, issuer: str, leeway: int) -> dict[str, Any]:
    """The claims of a token signed by ``key``, for that audience and issuer; TokenError otherwise."""
    if key.algorithm_name != alg:
        raise TokenError(f"key {kid!r} does not sign with {alg}")
    try:
        claims = jwt.decode(
            token,
            key.key,
            algorithms=[alg],
            audience=audience,
            issuer=issuer,
            leeway=leeway,
            options={"require": ["exp", "iss", "aud", "sub"]},
        )
    except jwt.ExpiredSignatureError as exc:
        raise TokenError("token has expired", ErrorReason.TOKEN_EXPIRED) from exc
    except jwt.ImmatureSignatureError as exc:
        raise TokenError("token is not valid yet", ErrorReason.TOKEN_NOT_YET_VALID) from exc
    except jwt.InvalidAudienceError as exc:
        raise TokenError("token audience is not accepted") from exc
    except jwt.InvalidIssuerError as exc:
        raise TokenError("token issuer is not accepted") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise TokenError(f"token lacks the {exc.claim!r} claim") from exc
    except jwt.PyJWTError as exc:
        raise TokenError("token signature or claims are invalid") from exc
    return claims


def _caller_from_tenant_claims(claims: Mapping[str, Any], token: str, sso: TenantIssuer) -> Caller:
    """A tenant issuer's user: the issuer's tenant, named by email, with the role its groups map to."""
    email = claims.get(sso.email_claim)
    if not isinstance(email, str) or "@" not in email or len(email) > 254:
        raise TokenError(f"token lacks a valid {sso.email_claim!r} claim (the user's email)")
    role = sso.role_for(claims.get(sso.groups_claim))
    if role is None:
        raise TokenError(f"none of the token's {sso.groups_claim!r} maps to a role of tenant {sso.tenant_id}")
    if role == PLATFORM_ADMIN_ROLE:
        raise TokenError(f"role {role!r} cannot be given by a tenant's identity provider")
    return Caller(
        subject=email.strip().lower(),
        tenant_id=sso.tenant_id,
        role=role,
        # A custom role's permissions are the registry user's, read on every call once signed in.
        permissions=frozenset(ROLE_PERMISSIONS.get(role, ())),
        token=token,
    )


def _caller_from_claims(claims: Mapping[str, Any], token: str, *, service: bool = False) -> Caller:
    subject = claims.get("sub")
    tenant_id = claims.get("tenant_id")
    role = claims.get("role", "")
    permissions = claims.get("permissions", [])
    if not isinstance(subject, str) or not subject or len(subject) > 200:
        raise TokenError("token lacks a valid 'sub' claim")
    if not isinstance(tenant_id, str) or not tenant_id:
        raise TokenError("token lacks the 'tenant_id' claim")
    if not is_valid_tenant_id(tenant_id):
        raise TokenError("token 'tenant_id' claim is not a valid tenant id")
    if not isinstance(role, str):
        raise TokenError("token 'role' claim must be a string")
    if not isinstance(permissions, list) or not all(isinstance(p, str) for p in permissions):
        raise TokenError("token 'permissions' claim must be a list of strings")
    if service and (tenant_id != PLATFORM_TENANT or not subject.startswith(SERVICE_SUBJECT_PREFIX)):
        raise TokenError("a service token must name a platform service (sub 'service:<name>', tenant 'platform')")
    return Caller(
        subject=subject,
        tenant_id=tenant_id,
        role=role,
        permissions=frozenset(permissions),
        token=token,
        service=service,
    )
