"""TenantSettings in storage: sealed secrets (``MASK`` keeps the stored one), masked reads, copies between tenants."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format
from towerco.tenant.v1 import tenant_registry_service_pb2 as pb

from services.runtime.errors import FieldViolation, invalid_argument
from services.runtime.validation import path_key

from .secrets import MASK, SecretBox
from .tenant_settings_rules import NO_KEY_TO_KEEP, NO_PASSWORD_TO_KEEP, configured, fill_defaults


def _secret_aad(tenant_id: str, path: str) -> str:
    return f"{tenant_id}/{path}"


def to_document(
    settings: pb.TenantSettings, box: SecretBox, tenant_id: str, previous: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The stored form (call after ``validate``): secrets sealed, ``MASK`` keeps the stored secret."""
    plain = pb.TenantSettings()
    plain.CopyFrom(settings)
    plain.tenant_id = ""
    plain.branding.display_name = ""
    fill_defaults(plain)
    old_secrets = dict((previous or {}).get("secrets", {}))
    secrets: dict[str, Any] = {}
    problems = []
    integrations = plain.integrations
    if integrations.HasField("smtp") and configured(integrations.smtp):
        password = integrations.smtp.password
        if password == MASK:
            if "smtp.password" in old_secrets:
                secrets["smtp.password"] = old_secrets["smtp.password"]
            else:
                problems.append(FieldViolation("settings.integrations.smtp.password", NO_PASSWORD_TO_KEEP))
        elif password:
            secrets["smtp.password"] = box.seal(password, _secret_aad(tenant_id, "integrations.smtp.password"))
        integrations.smtp.password = ""
    else:
        integrations.ClearField("smtp")  # nothing set is the platform's server
    for name, value in sorted(integrations.api_keys.items()):
        key = f"api_keys.{name}"
        if value != MASK:
            secrets[key] = box.seal(value, _secret_aad(tenant_id, f"integrations.{key}"))
        elif key in old_secrets:
            secrets[key] = old_secrets[key]
        else:
            problems.append(FieldViolation(f"settings.integrations.api_keys[{path_key(name)}]", NO_KEY_TO_KEEP))
        integrations.api_keys[name] = ""
    if problems:
        raise invalid_argument(problems)
    return {"settings": json_format.MessageToDict(plain), "secrets": secrets}


def from_document(document: Mapping[str, Any], tenant_id: str) -> pb.TenantSettings:
    """The masked form: ``MASK`` wherever a secret is stored, never the secret."""
    settings = json_format.ParseDict(document.get("settings", {}), pb.TenantSettings(), ignore_unknown_fields=True)
    secrets = document.get("secrets", {})
    integrations = settings.integrations
    if "smtp.password" in secrets:
        integrations.smtp.password = MASK
    elif integrations.HasField("smtp") and not configured(integrations.smtp):
        integrations.ClearField("smtp")  # documents that stored an empty SMTP message
    for name in list(integrations.api_keys):
        integrations.api_keys[name] = MASK if f"api_keys.{name}" in secrets else ""
    fill_defaults(settings)
    settings.tenant_id = tenant_id
    return settings


def reveal_secret(document: Mapping[str, Any], box: SecretBox, tenant_id: str, path: str) -> str | None:
    """The plaintext of one secret (``smtp.password``, ``api_keys.<name>``), for the senders that use it."""
    envelope = document.get("secrets", {}).get(path)
    return None if envelope is None else box.open(envelope, _secret_aad(tenant_id, f"integrations.{path}"))


def reseal(document: Mapping[str, Any], box: SecretBox, source: str, target: str) -> dict[str, Any]:
    """A copy of ``source``'s settings document whose secrets open only for ``target``."""
    secrets = {
        path: box.seal(
            box.open(envelope, _secret_aad(source, f"integrations.{path}")), _secret_aad(target, f"integrations.{path}")
        )
        for path, envelope in document.get("secrets", {}).items()
    }
    return {"settings": dict(document.get("settings", {})), "secrets": secrets}
