"""Changes to a TenantSettings message, named in the tables of bad and good values that the
settings tests (through the API, and of the rules alone) run."""

from __future__ import annotations

from collections.abc import Callable

from towerco.tenant.v1 import tenant_registry_service_pb2 as pb

Mutate = Callable[[pb.TenantSettings], None]


def set_field(part: str, name: str, value: object) -> Mutate:
    """``settings.<part>.<name> = value``."""
    return lambda s: setattr(getattr(s, part), name, value)


def set_api_key(name: str, value: str) -> Mutate:
    """``settings.integrations.api_keys[name] = value``."""
    return lambda s: s.integrations.api_keys.__setitem__(name, value)
