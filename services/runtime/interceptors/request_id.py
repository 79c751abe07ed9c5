"""Outermost link: give the call a request id and a fresh request context.

It never fails, so everything inside it, error reporting included, runs with the
request id bound (and logged).
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from grpc import aio

from .. import context
from ..audit import client_ip
from ..policy import Policy
from .base import Behavior, Metadata, PolicyInterceptor

#: A client's ``x-request-id`` is kept when it matches this; otherwise one is made. The
#: gateway renders the same rule into its configuration (``gateway/config.py``).
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class RequestContextInterceptor(PolicyInterceptor):
    """Binds a new :class:`RequestContext`; keeps a well-formed ``x-request-id``."""

    def wrap(self, inner: Behavior, policy: Policy, metadata: Metadata) -> Behavior:
        async def behavior(request: Any, ctx: aio.ServicerContext[Any, Any]) -> Any:
            supplied = metadata.first("x-request-id") or ""
            request_id = supplied if REQUEST_ID.fullmatch(supplied) else uuid.uuid4().hex
            ctx.set_trailing_metadata((("x-request-id", request_id),))
            peer = ctx.peer()
            ip = client_ip(metadata.first("x-forwarded-for"), peer)
            bound = context.RequestContext(request_id=request_id, method=policy.method, peer=peer, client_ip=ip)
            with context.bind(bound):
                return await inner(request, ctx)

        return behavior
