"""Request text link: no request reaches a handler with text its fields may not hold.

Every string of every request is checked against the text rules (no U+0000 anywhere;
display names clean), from the request type's descriptor, so no servicer has to remember
them and no NUL reaches PostgreSQL (which cannot store it) as an INTERNAL error. What to
check is worked out per method once, at start-up.
"""

from __future__ import annotations

from typing import Any

from grpc import aio

from ..errors import invalid_argument
from ..policy import Policy, PolicyTable
from ..text_fields import TextFields
from .base import Behavior, Metadata, PolicyInterceptor


class RequestTextInterceptor(PolicyInterceptor):
    """INVALID_ARGUMENT with a field violation naming each field that breaks a text rule."""

    def __init__(self, policies: PolicyTable) -> None:
        super().__init__(policies)
        self._fields: dict[str, TextFields] = {}
        for policy in policies:
            fields = TextFields.of(policy.request_type) if policy.request_type is not None else None
            if fields is not None and not fields.empty:
                self._fields[policy.method] = fields

    def wrap(self, inner: Behavior, policy: Policy, metadata: Metadata) -> Behavior:
        fields = self._fields.get(policy.method)
        if fields is None:
            return inner

        async def behavior(request: Any, ctx: aio.ServicerContext[Any, Any]) -> Any:
            violations = fields.violations(request)
            if violations:
                raise invalid_argument(violations)
            return await inner(request, ctx)

        return behavior
