"""A tenant's OpenID Connect provider: its signing keys, found through its discovery document.

The keys of an issuer are read from ``<issuer>/.well-known/openid-configuration`` (whose
``issuer`` must be the configured one exactly) and the ``jwks_uri`` it names, over HTTPS;
plain HTTP is accepted for loopback addresses only, which is what tests serve. Redirects
are not followed (a redirect could leave HTTPS), answers are bounded in size and time.

Keys are kept for ``max_age_seconds``; a token signed with a key not held makes the keys
be fetched again (the provider rotated), but at most once per ``refresh_floor_seconds``,
so a stream of tokens with made-up key ids cannot make the platform hammer the provider.
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jwt
from jwt import PyJWK

DISCOVERY_PATH = "/.well-known/openid-configuration"


class ProviderError(Exception):
    """The provider's discovery document or keys cannot be had or are not acceptable."""


@dataclass(frozen=True)
class ProviderLimits:
    """How long, how big and how often a provider is read."""

    timeout_seconds: float = 3.0
    #: A discovery document or JWKS larger than this is refused.
    max_bytes: int = 256 * 1024
    #: Keys beyond this many in one JWKS are ignored.
    max_keys: int = 32
    #: Keys are fetched again after this long, whatever the tokens say.
    max_age_seconds: float = 3600.0
    #: Least time between two fetches caused by unknown key ids.
    refresh_floor_seconds: float = 30.0


def check_url(url: str) -> str:
    """The URL itself if it may be fetched: HTTPS, or HTTP to a loopback address."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        return url
    raise ProviderError(f"{url!r} is not an https URL (plain http is allowed for loopback addresses only)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def fetch_json(url: str, limits: ProviderLimits) -> dict[str, Any]:
    """One JSON object from an acceptable URL, within the limits."""
    check_url(url)
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310 (check_url above)
    try:
        with _OPENER.open(request, timeout=limits.timeout_seconds) as response:
            body = response.read(limits.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ProviderError(f"cannot fetch {url}: {exc}") from exc
    if len(body) > limits.max_bytes:
        raise ProviderError(f"{url} answered more than {limits.max_bytes} bytes")
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise ProviderError(f"{url} did not answer JSON") from exc
    if not isinstance(document, dict):
        raise ProviderError(f"{url} did not answer a JSON object")
    return document


def parse_jwks(document: dict[str, Any], max_keys: int) -> dict[str, PyJWK]:
    """The signing keys of a JWKS by key id; entries without one, or unusable, are skipped."""
    keys: dict[str, PyJWK] = {}
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise ProviderError("the JWKS has no 'keys' list")
    for entry in entries[:max_keys]:
        if not isinstance(entry, dict):
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid or entry.get("use", "sig") != "sig":
            continue
        try:
            keys[kid] = PyJWK(entry)
        except jwt.PyJWTError:
            continue
    return keys


class ProviderKeys:
    """One issuer's keys: fetched on first need, kept, refreshed on an unknown key id (floored)."""

    def __init__(self, issuer: str, limits: ProviderLimits | None = None) -> None:
        self.issuer = issuer
        self._limits = limits or ProviderLimits()
        self._keys: dict[str, PyJWK] = {}
        self._fetched_at = 0.0
        self._last_attempt = float("-inf")
        #: Why the last fetch failed (None: it did not), told again until the next attempt.
        self._failure: str | None = None
        self._lock = threading.Lock()
        #: How many times the provider was read (discovery and JWKS count as one).
        self.fetches = 0

    def key_for(self, kid: str) -> PyJWK | None:
        """The key with that id, or None if the provider does not (or cannot now) show one."""
        now = time.monotonic()
        key = self._keys.get(kid)
        if key is not None and now - self._fetched_at < self._limits.max_age_seconds:
            return key
        with self._lock:
            key = self._keys.get(kid)
            now = time.monotonic()
            fresh = self._fetched_at > 0 and now - self._fetched_at < self._limits.max_age_seconds
            if key is not None and fresh:
                return key
            if now - self._last_attempt < self._limits.refresh_floor_seconds:
                # Too soon to ask again: keep answering from the keys held (even aged ones).
                if key is None and self._failure is not None:
                    raise ProviderError(self._failure)
                return key
            self._last_attempt = now
            try:
                self._refresh()
            except ProviderError as exc:
                self._failure = str(exc)
                if key is not None:
                    return key  # an aged key still verifies while the provider is down
                raise
            self._failure = None
            return self._keys.get(kid)

    def _refresh(self) -> None:
        self.fetches += 1
        discovery = fetch_json(self.issuer.rstrip("/") + DISCOVERY_PATH, self._limits)
        if discovery.get("issuer") != self.issuer:
            raise ProviderError(f"the discovery document of {self.issuer} names issuer {discovery.get('issuer')!r}")
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise ProviderError(f"the discovery document of {self.issuer} has no jwks_uri")
        self._keys = parse_jwks(fetch_json(jwks_uri, self._limits), self._limits.max_keys)
        self._fetched_at = time.monotonic()


class ProviderDirectory:
    """The providers this process has met, by issuer; the least recently used beyond ``size`` dropped."""

    def __init__(self, limits: ProviderLimits | None = None, size: int = 1000) -> None:
        self._limits = limits or ProviderLimits()
        self._size = size
        self._providers: OrderedDict[str, ProviderKeys] = OrderedDict()
        self._lock = threading.Lock()

    def keys_of(self, issuer: str) -> ProviderKeys:
        with self._lock:
            provider = self._providers.get(issuer)
            if provider is None:
                provider = self._providers[issuer] = ProviderKeys(issuer, self._limits)
                if len(self._providers) > self._size:
                    self._providers.popitem(last=False)
            else:
                self._providers.move_to_end(issuer)
            return provider

    def forget(self, issuer: str) -> None:
        """Drop an issuer's keys (its configuration changed or went): the next token fetches anew."""
        with self._lock:
            self._providers.pop(issuer, None)
