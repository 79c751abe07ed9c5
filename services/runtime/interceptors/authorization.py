"""Authorization link: the caller must hold the permission the RPC declares.

Internal RPCs (``internal: true``) additionally need a platform service identity: a
token from the service issuer. No end-user token passes, a platform admin's included.

A token of a tenant's registry user (``sub`` = ``user-...``) holds the permissions of the
role the user holds now, and none while the user is deactivated or deleted
(``services/runtime/user_access.py``): one cached lookup per call, a dictionary hit.
"""

from __future__ import annotations

from typing import Any

from grpc import aio

from .. import context
from ..errors import ErrorReason, permission_denied
from ..policy import Policy, PolicyTable
from ..tenants import TenantDirectory
from ..user_access import is_registry_user
from .base import Behavior, Metadata, PolicyInterceptor


class AuthorizationInterceptor(PolicyInterceptor):
    """PERMISSION_DENIED unless the caller's permissions have the declared one."""

    def __init__(self, policies: PolicyTable, tenants: TenantDirectory | None = None) -> None:
        super().__init__(policies)
        self._tenants = tenants

    def wrap(self, inner: Behavior, policy: Policy, metadata: Metadata) -> Behavior:
        if policy.public:
            return inner
        users = self._tenants.users if self._tenants is not None else None

        async def behavior(request: Any, ctx: aio.ServicerContext[Any, Any]) -> Any:
            caller = context.current_caller()
            if policy.internal and (caller is None or not caller.service):
                raise permission_denied(
                    "this method is internal to the platform: only its services may call it",
                    ErrorReason.SERVICE_IDENTITY_REQUIRED,
                )
            if caller is None:
                permissions: frozenset[str] = frozenset()
            elif users is not None and is_registry_user(caller.subject) and (tenant_id := context.tenant_user_call()):
                permissions = await users.permissions(caller, tenant_id)
            else:
                permissions = caller.permissions  # any other token: its claim (one string test per call)
            if caller is None or policy.permission not in permissions:
                raise permission_denied(
                    f"this call needs the {policy.permission!r} permission",
                    ErrorReason.PERMISSION_MISSING,
                    permission=policy.permission,
                )
            return await inner(request, ctx)

        return behavior
