"""What a tenant's registry user may do now: whether it is active, and its role's permissions.

A token whose ``sub`` is a registry user id (``user-...``, made by UserService) stands for
that user: every service reads the user's state and role through the tenant cache (memory,
then Redis, then the registry), so a deactivation, deletion or role change reaches every
process with the tenant's change notice, though the token itself stays valid. A token
naming no registry user (``make token``'s ``dev-admin@<tenant>``, tests' subjects) is taken
at its claims: only the platform's issuer signs them, and it signs registry users' tokens
with their user id.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from towerco.internal.v1 import tenant_data_pb2, tenant_data_pb2_grpc

from .context import Caller
from .errors import ErrorReason, ServiceError, permission_denied, unauthenticated, unavailable
from .identity import ServiceIdentity
from .lookups import InternalLookup
from .tenant_cache import TenantCache, Versioned

#: What every user id the registry makes starts with.
USER_ID_PREFIX = "user-"
#: The cache kind of one user (``user:<user_id>``), versioned like the tenant's state.
KIND_PREFIX = "user:"

#: Reads a user's access from the source of truth: the tenant's version and the user's
#: value (None if the tenant has no such user); version 0 if the tenant is unknown.
UserSource = Callable[[str, str], Awaitable[Versioned]]


def is_registry_user(subject: str) -> bool:
    return subject.startswith(USER_ID_PREFIX)


@dataclass(frozen=True)
class UserAccess:
    active: bool
    role: str
    permissions: frozenset[str]

    @classmethod
    def from_value(cls, value: dict[str, Any] | None) -> UserAccess | None:
        if value is None:
            return None
        return cls(bool(value["active"]), str(value["role"]), frozenset(value["permissions"]))

    def as_value(self) -> dict[str, Any]:
        return {"active": self.active, "role": self.role, "permissions": sorted(self.permissions)}


class UserDirectory:
    """Registry users' access, from memory whenever possible."""

    def __init__(self, cache: TenantCache, source: UserSource) -> None:
        self._cache = cache
        self._source = source

    async def get(self, tenant_id: str, user_id: str) -> UserAccess | None:
        item = await self._cache.get(tenant_id, KIND_PREFIX + user_id, lambda: self._source(tenant_id, user_id))
        return UserAccess.from_value(item.value)

    async def permissions(self, caller: Caller, tenant_id: str) -> frozenset[str]:
        """The caller's permissions in its tenant now; a deleted or deactivated user is refused."""
        if not is_registry_user(caller.subject):
            return caller.permissions
        try:
            access = await self.get(tenant_id, caller.subject)
        except ServiceError:
            raise
        except Exception:
            raise unavailable(
                "the tenant registry cannot be reached to check this user; retry shortly",
                ErrorReason.TENANT_DIRECTORY_UNAVAILABLE,
            ) from None
        if access is None:
            raise unauthenticated(
                f"the token's user {caller.subject!r} is not a user of tenant {tenant_id!r} (deleted?); sign in again",
                ErrorReason.USER_UNKNOWN,
            )
        if not access.active:
            raise permission_denied(
                f"user {caller.subject!r} has been deactivated; a tenant admin can reactivate it",
                ErrorReason.USER_DEACTIVATED,
                tenant_id=tenant_id,
            )
        return access.permissions


class RegistryUserSource(InternalLookup):
    """Asks the tenant registry, as this service."""

    def __init__(self, target: str, identity: ServiceIdentity, timeout: float = 2.0) -> None:
        super().__init__(target, identity, timeout)
        self._stub = tenant_data_pb2_grpc.TenantDirectoryServiceStub(self.channel)

    async def __call__(self, tenant_id: str, user_id: str) -> Versioned:
        request = tenant_data_pb2.GetUserAccessRequest(tenant_id=tenant_id, user_id=user_id)
        reply = await self.ask(self._stub.GetUserAccess, request)
        if reply is None:
            return Versioned(0, None)
        if not reply.known:
            return Versioned(reply.version, None)
        access = UserAccess(reply.active, reply.role, frozenset(reply.permissions))
        return Versioned(reply.version, access.as_value())
