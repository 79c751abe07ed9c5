"""Tenant-state link: a suspended, deleted or unknown tenant's users are turned away.

Runs after the tenant link, from the cached tenant state (memory first), so it costs a
dictionary lookup on almost every call. Public RPCs, platform admins and platform
services pass: they are how a tenant is looked up, repaired and reactivated.
"""

from __future__ import annotations

from typing import Any

from grpc import aio

from .. import context
from ..errors import ErrorReason, Reason, permission_denied
from ..policy import Policy, PolicyTable
from ..tenants import State, TenantDirectory
from .base import Behavior, Metadata, PolicyInterceptor

_REFUSALS: dict[int, tuple[Reason, str]] = {
    State.STATE_PROVISIONING: (ErrorReason.TENANT_PROVISIONING, "is still being set up; try again shortly"),
    State.STATE_SUSPENDED: (ErrorReason.TENANT_SUSPENDED, "is suspended; contact the platform operator"),
    State.STATE_DELETING: (ErrorReason.TENANT_DELETED, "has been deleted"),
    State.STATE_DELETED: (ErrorReason.TENANT_DELETED, "has been deleted"),
}
#: Read once: a protobuf enum's attribute is a lookup through its wrapper on every access.
_ACTIVE = State.STATE_ACTIVE


class TenantStateInterceptor(PolicyInterceptor):
    """PERMISSION_DENIED unless the call's tenant is ACTIVE."""

    def __init__(self, policies: PolicyTable, directory: TenantDirectory) -> None:
        super().__init__(policies)
        self._directory = directory

    def wrap(self, inner: Behavior, policy: Policy, metadata: Metadata) -> Behavior:
        if policy.public:
            return inner

        async def behavior(request: Any, ctx: aio.ServicerContext[Any, Any]) -> Any:
            tenant_id = context.tenant_user_call()
            if tenant_id is not None:
                await self.check(tenant_id)
            return await inner(request, ctx)

        return behavior

    async def check(self, tenant_id: str) -> None:
        info = await self._directory.answer(tenant_id)
        if info is None:
            raise permission_denied(f"tenant {tenant_id!r} is not known to the platform", ErrorReason.TENANT_UNKNOWN)
        if info.state != _ACTIVE:
            reason, why = _REFUSALS.get(info.state, (ErrorReason.TENANT_UNAVAILABLE, "cannot be served"))
            raise permission_denied(f"tenant {tenant_id!r} {why}", reason, tenant_id=tenant_id)
