"""JWT verification against a JWKS: pinned issuer and audience, an algorithm allow-list.

Two issuers are trusted, each with its own keys: the identity provider that signs
end users' tokens, and the platform's service issuer that signs the tokens services
present to each other. A token is checked only against the keys of the issuer it
names, and only the service issuer's tokens make a :class:`Caller` a service.

Verified tokens are cached by their exact text until they expire, so a token seen again
costs a dictionary lookup, not an RSA verification.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any

import jwt
from jwt import PyJWK, PyJWKClient

from . import error_catalogue
from .context import PLATFORM_TENANT, Caller, is_valid_tenant_id
from .errors import ErrorReason, Reason

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


class TokenVerifier:
    """Verifies bearer tokens and turns their claims into a :class:`Caller`."""

    def __init__(
        self, config: VerifierConfig, keys: KeySet | None = None, *, service: VerifierConfig | None = None
    ) -> None:
        self._config = config
        self._issuers: dict[str, tuple[VerifierConfig, KeySet]] = {config.issuer: (config, keys or KeySet(config))}
        if service is not None:
            if service.issuer == config.issuer:
                raise ValueError("the service issuer must differ from the users' issuer")
            self._issuers[service.issuer] = (dataclass_replace(service, service=True), KeySet(service))
        self._cache: OrderedDict[str, tuple[Caller, float]] = OrderedDict()

    def verify_cached(self, token: str) -> Caller:
        """The caller of a token verified before and not yet expired; KeyError otherwise."""
        caller, expires = self._cache[token]
        if time.time() >= expires + self._config.leeway_seconds:
            self._cache.pop(token, None)
            raise KeyError(token)
        self._cache.move_to_end(token)
        return caller

    def verify(self, token: str) -> Caller:
        try:
            return self.verify_cached(token)
        except KeyError:
            pass
        caller, expires = self._verify_uncached(token)
        self._cache[token] = (caller, expires)
        if len(self._cache) > self._config.cache_size:
            self._cache.popitem(last=False)
        return caller

    def _verify_uncached(self, token: str) -> tuple[Caller, float]:
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
        config, keys = self._issuer_of(token)
        key = keys.key_for(kid)
        if key.algorithm_name != alg:
            raise TokenError(f"key {kid!r} does not sign with {alg}")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=config.audience,
                issuer=config.issuer,
                leeway=config.leeway_seconds,
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
        return _caller_from_claims(claims, token, service=config.service), float(claims["exp"])

    def _issuer_of(self, token: str) -> tuple[VerifierConfig, KeySet]:
        """The trusted issuer the token names (read before, and checked again by, verification)."""
        try:
            issuer = jwt.decode(token, options={"verify_signature": False}).get("iss")
        except jwt.PyJWTError as exc:
            raise TokenError("token is malformed") from exc
        if len(self._issuers) == 1 or issuer not in self._issuers:
            # One issuer, or an unknown one: let verification report the mismatch as usual.
            return self._config, self._issuers[self._config.issuer][1]
        return self._issuers[issuer]


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
