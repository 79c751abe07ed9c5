"""Secret setting values sealed at rest with AES-256-GCM, with the key id kept for rotation."""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.runtime.settings import SettingsError, data_dir

#: What reads show instead of a stored secret; sending it back keeps the stored value.
MASK = "********"


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
        cipher = self._keys.get(str(envelope.get("kid", "")))
        if cipher is None:
            raise SecretError(f"sealed with an unknown key {envelope.get('kid')!r}")
        try:
            nonce = base64.b64decode(envelope["nonce"], validate=True)
            sealed = base64.b64decode(envelope["ct"], validate=True)
            return cipher.decrypt(nonce, sealed, aad.encode()).decode()
        except (KeyError, binascii.Error, InvalidTag, UnicodeDecodeError) as exc:
            raise SecretError("sealed value does not open with this key and context") from exc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _parse(entries: list[str], source: str) -> dict[str, bytes]:
    keys: dict[str, bytes] = {}
    for entry in entries:
        kid, sep, encoded = entry.strip().partition("=")
        if not sep or not kid:
            raise SettingsError(f"{source}: each key must be written kid=<base64 of 32 bytes>")
        try:
            keys[kid.strip()] = base64.b64decode(encoded.strip(), validate=True)
        except binascii.Error:
            raise SettingsError(f"{source}: key {kid.strip()!r} is not valid base64") from None
    if not keys:
        raise SettingsError(f"{source}: no keys")
    return keys


def load_secret_box(env: Mapping[str, str] = os.environ, dev_file: Path | None = None) -> SecretBox:
    """Keys from ``SETTINGS_ENCRYPTION_KEYS`` (``kid=base64,...``; first active unless
    ``SETTINGS_ENCRYPTION_KEY_ID`` names one), else the dev file ``make keys`` writes."""
    raw = env.get("SETTINGS_ENCRYPTION_KEYS", "").strip()
    if raw:
        entries, source = [e for e in raw.split(",") if e.strip()], "SETTINGS_ENCRYPTION_KEYS"
    else:
        path = dev_file or data_dir() / "keys" / "settings-encryption.keys"
        if not path.exists():
            raise SettingsError(
                f"SETTINGS_ENCRYPTION_KEYS is not set and no dev key file exists at {path}; "
                "run `make keys` (dev) or set it (deploy)"
            )
        entries, source = [line for line in path.read_text().splitlines() if line.strip()], str(path)
    keys = _parse(entries, source)
    active = env.get("SETTINGS_ENCRYPTION_KEY_ID", "").strip() or next(iter(keys))
    return SecretBox(keys, active)
