"""This process's own identity towards the other platform services.

A service signs short-lived tokens with the platform's service key (issuer
``SERVICE_JWT_ISSUER``, subject ``service:<name>``, tenant ``platform``). Receivers
verify them against the service JWKS, a key set separate from the users' identity
provider, so no end-user token can ever pass for a service.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import jwt

from .auth import SERVICE_SUBJECT_PREFIX
from .context import PLATFORM_TENANT

#: What a service token allows: the internal contracts between services.
SERVICE_PERMISSIONS = ("platform.internal", "audit.write")
SERVICE_ROLE = "service"


@dataclass
class ServiceIdentity:
    """Mints this service's token once and again shortly before it expires."""

    name: str
    issuer: str
    audience: str
    key_pem: bytes = field(repr=False)
    kid: str
    algorithm: str = "ES256"
    ttl_seconds: int = 300
    _token: str = field(default="", repr=False)
    _renew_at: float = 0.0

    @classmethod
    def from_file(cls, name: str, *, issuer: str, audience: str, key_file: str, kid: str) -> ServiceIdentity:
        pem = Path(key_file).read_bytes()
        algorithm = "RS256" if b"RSA" in pem.split(b"\n", 1)[0] else "ES256"
        return cls(name=name, issuer=issuer, audience=audience, key_pem=pem, kid=kid, algorithm=algorithm)

    def token(self) -> str:
        now = time.time()
        if not self._token or now >= self._renew_at:
            self._token = mint_service_token(
                self.key_pem, self.kid, self.name, issuer=self.issuer, audience=self.audience,
                ttl=self.ttl_seconds, algorithm=self.algorithm,
            )  # fmt: skip
            self._renew_at = now + self.ttl_seconds * 0.8
        return self._token


def mint_service_token(
    key_pem: bytes, kid: str, service: str, *, issuer: str, audience: str, ttl: int = 300, algorithm: str = "ES256"
) -> str:
    now = int(time.time())
    claims = {
        "iss": issuer,
        "aud": audience,
        "sub": f"{SERVICE_SUBJECT_PREFIX}{service}",
        "tenant_id": PLATFORM_TENANT,
        "role": SERVICE_ROLE,
        "permissions": list(SERVICE_PERMISSIONS),
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, key_pem, algorithm=algorithm, headers={"kid": kid})
