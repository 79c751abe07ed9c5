"""Secret setting values sealed at rest with AES-256-GCM, with the key id kept for rotation."""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.runtime.environment import process_environment
from services.runtime.settings import (
    SETTINGS_ENCRYPTION_KEY_ID,
    SETTINGS_ENCRYPTION_KEYS,
    SettingsError,
    data_dir,
)

#: What reads show instead of a stored secret; sending it back keeps the stored value.
MASK = "********"
KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
KEY_FORMAT = "kid=<base64 of 32 random bytes> (kid: letters, digits, '.', '_', '-')"


class SecretError(ValueError):
    """A sealed value cannot be opened (unknown key id, or altered or moved ciphertext)."""


class SecretBox:
    """Seals with the active key; opens with any key it knows (old ones, after a rotation)."""

    def __init__(self, keys: Mapping[str, bytes], active_kid: str) -> None:
        if active_kid not in keys:
            raise SettingsError(f"settings encryption key {active_kid!r} is not among the configured keys")
        for kid, key in keys.items():
            if len(key) != 32:
                raise SettingsError(f"settings encryption key {kid!r} must be 32 bytes (AES-256)")
        self._keys = {kid: AESGCM(key) for kid, key in keys.items()}
        self.active_kid = active_kid

    def __repr__(self) -> str:
        return f"SecretBox(kids={sorted(self._keys)}, active={self.active_kid!r})"

    def seal(self, plaintext: str, aad: str) -> dict[str, str]:
        nonce = os.urandom(12)
        sealed = self._keys[self.active_kid].encrypt(nonce, plaintext.encode(), aad.encode())
        return {"kid": self.active_kid, "nonce": _b64(nonce), "ct": _b64(sealed)}

    def open(self, envelope: Mapping[str, str], aad: str) -> str:
        if not isinstance(envelope, Mapping):
            raise SecretError("sealed value is not an envelope {kid, nonce, ct}")
        kid = envelope.get("kid")
        cipher = self._keys.get(kid) if isinstance(kid, str) else None
        if cipher is None:
            raise SecretError(f"sealed with an unknown key {str(kid)[:64]!r}")
        try:
            nonce = base64.b64decode(envelope["nonce"], validate=True)
            sealed = base64.b64decode(envelope["ct"], validate=True)
            return cipher.decrypt(nonce, sealed, aad.encode()).decode()
        # ValueError: bad base64 (binascii.Error), non-ASCII text, a nonce of the wrong size.
        except (KeyError, TypeError, ValueError, InvalidTag) as exc:
            raise SecretError("sealed value does not open with this key and context") from exc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _parse(entries: list[str], source: str) -> dict[str, bytes]:
    keys: dict[str, bytes] = {}
    for entry in entries:
        kid, sep, encoded = (part.strip() for part in entry.strip().partition("="))
        if not sep or not KEY_ID.fullmatch(kid):
            raise SettingsError(f"{source}: each key must be written {KEY_FORMAT}")
        if kid in keys:
            raise SettingsError(f"{source}: key id {kid!r} appears twice")
        try:
            keys[kid] = base64.b64decode(encoded, validate=True)
        except ValueError:  # binascii.Error, or text that is not ASCII
            raise SettingsError(f"{source}: key {kid!r} is not valid base64") from None
    if not keys:
        raise SettingsError(f"{source}: no keys")
    return keys


def load_secret_box(env: Mapping[str, str] | None = None, dev_file: Path | None = None) -> SecretBox:
    """Keys from ``SETTINGS_ENCRYPTION_KEYS`` (``kid=base64,...``; first active unless
    ``SETTINGS_ENCRYPTION_KEY_ID`` names one), else the dev file ``make keys`` writes;
    read from ``env`` (the process environment by default)."""
    env = process_environment() if env is None else env
    raw = SETTINGS_ENCRYPTION_KEYS.read(env)
    if raw:
        entries, source = [e for e in raw.split(",") if e.strip()], "SETTINGS_ENCRYPTION_KEYS"
    else:
        path = dev_file or data_dir(env) / "keys" / "settings-encryption.keys"
        if not path.exists():
            raise SettingsError(
                f"SETTINGS_ENCRYPTION_KEYS is not set and no dev key file exists at {path}; "
                f"run `make keys` (dev) or set it to {KEY_FORMAT}, comma-separated, active first (deploy)"
            )
        lines = path.read_text().splitlines()
        entries, source = [line for line in lines if line.strip() and not line.lstrip().startswith("#")], str(path)
    keys = _parse(entries, source)
    active = SETTINGS_ENCRYPTION_KEY_ID.read(env) or next(iter(keys))
    if active not in keys:
        raise SettingsError(f"SETTINGS_ENCRYPTION_KEY_ID={active!r} names none of the keys in {source}")
    return SecretBox(keys, active)
