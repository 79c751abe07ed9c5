"""AIP-158 pagination: page sizes and opaque, signed page tokens.

A token records where the previous page ended, for which tenant and for which query.
It is HMAC-signed, so it cannot be forged or edited, and it is refused for any other
tenant or query: a token never grants access to anything.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from .errors import ErrorReason, FieldViolation, ServiceError, invalid_argument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
_MAX_TOKEN_CHARS = 1024


def page_size(requested: int, *, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE) -> int:
    """0 means the default, too large is capped, negative is INVALID_ARGUMENT."""
    if requested < 0:
        raise invalid_argument([FieldViolation("page_size", "must not be negative")])
    if requested == 0:
        return default
    return min(requested, maximum)


class PageTokens:
    """Encodes and checks page tokens with one process-wide secret."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def encode(self, tenant_id: str, query: Mapping[str, Any], position: Mapping[str, Any]) -> str:
        body = json.dumps(
            {"t": tenant_id, "q": _digest(query), "p": dict(position)}, separators=(",", ":"), sort_keys=True
        ).encode()
        mac = hmac.new(self._secret, body, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(mac + body).decode().rstrip("=")

    def decode(self, token: str, tenant_id: str, query: Mapping[str, Any]) -> dict[str, Any] | None:
        """The position a token resumes from; None for an empty token."""
        if not token:
            return None
        bad = _bad_token
        if len(token) > _MAX_TOKEN_CHARS:
            raise bad("is too long")
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, TypeError):
            raise bad("is not a page token from this API") from None
        mac, body = raw[:16], raw[16:]
        if len(mac) < 16 or not hmac.compare_digest(mac, hmac.new(self._secret, body, hashlib.sha256).digest()[:16]):
            raise bad("is not a page token from this API")
        data = json.loads(body)
        if data.get("t") != tenant_id:
            raise bad("was issued for another caller")
        if data.get("q") != _digest(query):
            raise bad("was issued for a different query; keep the filters of the first page")
        position = data.get("p")
        if not isinstance(position, dict):
            raise bad("is not a page token from this API")
        return position


def _digest(query: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(query), sort_keys=True).encode()).hexdigest()[:16]


def _bad_token(why: str) -> ServiceError:
    return invalid_argument([FieldViolation("page_token", f"page token {why}")], reason=ErrorReason.INVALID_PAGE_TOKEN)
