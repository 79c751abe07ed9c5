"""Dev signing keys and dev tokens (``make token``).

The key pair is made once into ``.data/keys/``; its public half is published as
``.data/keys/jwks.json``, which the services verify against in dev. Production points
``JWT_JWKS_URL`` at the identity provider instead and never sees this key.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.runtime.context import PLATFORM_ADMIN_ROLE, PLATFORM_TENANT, is_valid_tenant_id
from services.runtime.environment import process_environment
from services.runtime.identity import mint_service_token
from services.runtime.roles import ROLE_PERMISSIONS
from services.runtime.settings import (
    DEV_SERVICE_KEY_ID,
    GATEWAY_SECRET_FILE,
    JWT_AUDIENCE,
    JWT_ISSUER,
    SERVICE_JWT_ISSUER,
)

KID = "towerco-dev-1"


def ensure_keys(keys_dir: Path) -> None:
    """Create the dev signing keys, their JWKS, the page-token and gateway secrets if missing."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(keys_dir, 0o700)
    # The users' identity provider in dev.
    _ensure_signing_key(keys_dir / "dev-signing-key.pem", keys_dir / "jwks.json", KID, "RS256")
    for name in ("page-token.secret", GATEWAY_SECRET_FILE):
        secret_path = keys_dir / name
        if not secret_path.exists():
            _write_private(secret_path, secrets.token_urlsafe(32).encode())
    # The platform's service issuer: a key set of its own, apart from the users'.
    _ensure_signing_key(
        keys_dir / "service-signing-key.pem", keys_dir / "service-jwks.json", DEV_SERVICE_KEY_ID, "ES256"
    )
    settings_keys = keys_dir / "settings-encryption.keys"
    if not settings_keys.exists():
        # AES-256-GCM key for secret tenant settings: `kid=base64`, the first line is active.
        encoded = base64.b64encode(secrets.token_bytes(32)).decode()
        _write_private(settings_keys, f"dev-1={encoded}\n".encode())


def _ensure_signing_key(private_path: Path, jwks_path: Path, kid: str, algorithm: str) -> None:
    """A signing key (RS256 or ES256) and the JWKS publishing its public half, if missing."""
    if private_path.exists():
        return
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if algorithm == "RS256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_private(private_path, pem)
    public.update({"kid": kid, "alg": algorithm, "use": "sig"})
    jwks_path.write_text(json.dumps({"keys": [public]}, indent=2) + "\n")


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def mint(
    keys_dir: Path,
    *,
    tenant: str = "",
    role: str = "admin",
    permissions: list[str] | None = None,
    ttl: int = 3600,
    subject: str = "",
    extra: dict[str, Any] | None = None,
) -> str:
    """A signed dev token; permissions default to the role's row of the roles table."""
    if role not in ROLE_PERMISSIONS:
        raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLE_PERMISSIONS)}")
    tenant = tenant or (PLATFORM_TENANT if role == PLATFORM_ADMIN_ROLE else "tenant_a")
    if not is_valid_tenant_id(tenant):
        raise ValueError(f"not a tenant id: {tenant!r}")
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": JWT_ISSUER.read(process_environment()),
        "aud": JWT_AUDIENCE.read(process_environment()),
        "sub": subject or f"dev-{role}@{tenant}",
        "tenant_id": tenant,
        "role": role,
        "permissions": list(ROLE_PERMISSIONS[role]) if permissions is None else permissions,
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
        "jti": uuid.uuid4().hex,
    }
    claims.update(extra or {})
    return jwt.encode(claims, _signing_key(keys_dir / "dev-signing-key.pem"), algorithm="RS256", headers={"kid": KID})


@functools.cache
def _loaded_key(path: Path, modified_ns: int) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def _signing_key(path: Path) -> rsa.RSAPrivateKey:
    """The dev RSA key, parsed once per file version: parsing checks the key, about 70 ms, where signing is 1 ms."""
    return _loaded_key(path, path.stat().st_mtime_ns)


def mint_service(keys_dir: Path, service: str = "tenant", ttl: int = 300) -> str:
    """A dev token of the platform's service issuer, as service ``service`` presents it."""
    return mint_service_token(
        (keys_dir / "service-signing-key.pem").read_bytes(),
        DEV_SERVICE_KEY_ID,
        service,
        issuer=SERVICE_JWT_ISSUER.read(process_environment()),
        audience=JWT_AUDIENCE.read(process_environment()),
        ttl=ttl,
    )
