"""Authorization link: the caller must hold the permission the RPC declares.

Internal RPCs (``internal: true``) additionally need a platform service identity: a
token from the service issuer. No end-user token passes, a platform admin's included.
"""

from __future__ import annotations

from typing import Any

from grpc import aio

from .. import context
from ..errors import ErrorReason, permission_denied
from ..policy import Policy
from .base import Behavior, Metadata, PolicyInterceptor


class AuthorizationInterceptor(PolicyInterceptor):
    """PERMISSION_DENIED unless the token's ``permissions`` claim has the declared one."""

    def wrap(self, inner: Behavior, policy: Policy, metadata: Metadata) -> Behavior:
        if policy.public:
            return inner

        async def behavior(request: Any, ctx: aio.ServicerContext[Any, Any]) -> Any:
            caller = context.current_caller()
            if policy.internal and (caller is None or not caller.service):
                raise permission_denied(
                    "this method is internal to the platform: only its services may call it",
                    ErrorReason.SERVICE_IDENTITY_REQUIRED,
                )
            if caller is None or policy.permission not in caller.permissions:
                raise permission_denied(
                    f"this call needs the {policy.permission!r} permission",
                    ErrorReason.PERMISSION_MISSING,
                    permission=policy.permission,
                )
            return await inner(request, ctx)

        return behavior
