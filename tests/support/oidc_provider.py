"""A test identity provider: its own RSA keys, discovery and JWKS served over HTTP on loopback."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm


class TestIdentityProvider:
    """Signs tokens as ``issuer``; ``rotate()`` adds a key, ``requests`` counts what was fetched."""

    __test__ = False

    def __init__(self, issuer: str) -> None:
        self.issuer = issuer
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.requests: list[str] = []
        self.rotate()

    def rotate(self) -> str:
        """A new signing key, published in the JWKS from now on; its kid."""
        kid = f"k-{uuid.uuid4().hex[:8]}"
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = kid
        return kid

    def jwks(self) -> dict[str, Any]:
        entries = []
        for kid, key in self.keys.items():
            entry = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
            entries.append({**entry, "kid": kid, "use": "sig", "alg": "RS256"})
        return {"keys": entries}

    def token(self, audience: str, *, kid: str | None = None, ttl: int = 300, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": self.issuer, "aud": audience, "sub": uuid.uuid4().hex, "iat": now, "exp": now + ttl, **claims}
        kid = kid or self.kid
        key = self.keys.get(kid) or self.keys[self.kid]  # an unpublished kid: signed, but unverifiable
        return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid})


@contextmanager
def serve_identity_provider(path: str = "/idp") -> Iterator[TestIdentityProvider]:
    """A provider whose issuer is ``http://127.0.0.1:<port><path>``, served until the block ends."""
    holder: dict[str, TestIdentityProvider] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            provider = holder["provider"]
            provider.requests.append(self.path)
            if self.path == f"{path}/.well-known/openid-configuration":
                body: dict[str, Any] = {"issuer": provider.issuer, "jwks_uri": f"{provider.issuer}/jwks"}
            elif self.path == f"{path}/jwks":
                body = provider.jwks()
            else:
                self.send_error(404)
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder["provider"] = TestIdentityProvider(f"http://127.0.0.1:{server.server_address[1]}{path}")
    thread = threading.Thread(target=server.serve_forever, name="test identity provider", daemon=True)
    thread.start()
    try:
        yield holder["provider"]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
