"""Request-scoped state: who is calling, for which tenant, under which request id.

Set by the interceptor chain for the duration of one call and reset when it ends, so
nothing leaks from one call into the next. Read by the data layer (to bind the tenant to
each transaction), by outgoing calls (to propagate it) and by logging.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

#: Tenant ids are slugs; validated before any use (header, token claim, request field).
TENANT_ID_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{2,49}$")

#: The reserved tenant whose `platform_admin` tokens administer the platform.
PLATFORM_TENANT = "platform"
PLATFORM_ADMIN_ROLE = "platform_admin"


def is_valid_tenant_id(value: str) -> bool:
    return bool(TENANT_ID_PATTERN.fullmatch(value))


@dataclass(frozen=True)
class Caller:
    """The verified identity behind a call (from its JWT)."""

    subject: str
    tenant_id: str
    role: str
    permissions: frozenset[str]
    #: The raw bearer token, forwarded on service-to-service calls; never logged.
    token: str = field(repr=False)

    @property
    def is_platform_admin(self) -> bool:
        return self.role == PLATFORM_ADMIN_ROLE and self.tenant_id == PLATFORM_TENANT


@dataclass(frozen=True)
class RequestContext:
    """Everything request-scoped; ``tenant_id`` is None only on public calls."""

    request_id: str
    method: str
    peer: str = ""
    caller: Caller | None = None
    tenant_id: str | None = None


_current: ContextVar[RequestContext | None] = ContextVar("towerco_request", default=None)


class NoTenantError(RuntimeError):
    """Code tried to reach tenant data outside a tenant-bound request (a bug)."""


def current() -> RequestContext | None:
    return _current.get()


def current_tenant() -> str:
    """The tenant of the call in progress; raises if there is none."""
    ctx = _current.get()
    if ctx is None or ctx.tenant_id is None:
        raise NoTenantError("no tenant bound to this call")
    return ctx.tenant_id


def current_caller() -> Caller | None:
    ctx = _current.get()
    return ctx.caller if ctx else None


@contextmanager
def bind(ctx: RequestContext) -> Iterator[RequestContext]:
    """Make ``ctx`` current for the enclosed block, restoring the previous one after."""
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)
