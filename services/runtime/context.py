"""Request-scoped state: who is calling, for which tenant, under which request id.

Set by the interceptor chain for the duration of one call and reset when it ends, so
nothing leaks from one call into the next. Read by the data layer (to bind the tenant to
each transaction), by outgoing calls (to propagate it) and by logging.
"""

from __future__ import annotations

import dataclasses
import logging
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
    #: True only for a token verified against the platform's service issuer and keys:
    #: one of the platform's own services, never an end user, whatever its claims say.
    service: bool = False

    @property
    def is_platform_admin(self) -> bool:
        return self.role == PLATFORM_ADMIN_ROLE and self.tenant_id == PLATFORM_TENANT and not self.service

    @property
    def is_platform(self) -> bool:
        """A platform admin or a platform service: may act on other tenants explicitly."""
        return self.service or self.is_platform_admin


@dataclass(frozen=True)
class RequestContext:
    """Everything request-scoped; ``tenant_id`` is None only on public calls."""

    request_id: str
    method: str
    peer: str = ""
    #: The peer's IP address: the client's on a direct call, the gateway's through it.
    peer_ip: str = ""
    #: The address the last ``x-forwarded-for`` entry names, believed only from the gateway
    #: or a platform service (see :attr:`client_ip`).
    forwarded_ip: str = ""
    #: Whether the call carries the gateway's secret (``audit.GATEWAY_HEADER``).
    via_gateway: bool = False
    caller: Caller | None = None
    tenant_id: str | None = None
    #: A tenant the caller named (``x-tenant-id``) but may not act on. The call is bound to
    #: the caller's own tenant meanwhile, so that tenant's state and rate apply to the
    #: attempt before it is refused (see ``interceptors/cross_tenant.py``).
    foreign_tenant: str | None = None

    @property
    def client_ip(self) -> str:
        """The client's address as the platform saw it (recorded in the audit log).

        The forwarded address when the call comes from the gateway (it carries the gateway's
        secret) or from a platform service (a service token); otherwise the peer's address:
        anyone else reaching a service directly would set whatever address they liked.
        """
        trusted = self.via_gateway or (self.caller is not None and self.caller.service)
        return self.forwarded_ip if trusted and self.forwarded_ip else self.peer_ip


log = logging.getLogger("towerco.platform")

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


def tenant_user_call() -> str | None:
    """The tenant of a call made by one of its own users: the one whose state and limits apply.

    None for public calls, for platform admins and platform services (they look tenants
    up, repair them and act for them, and are not held to any tenant's limits), and for
    the platform's own tenant.
    """
    ctx = _current.get()
    if ctx is None or ctx.caller is None or ctx.caller.is_platform or ctx.tenant_id in (None, PLATFORM_TENANT):
        return None
    return ctx.tenant_id


@contextmanager
def bind(ctx: RequestContext) -> Iterator[RequestContext]:
    """Make ``ctx`` current for the enclosed block, restoring the previous one after."""
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


class PlatformScopeError(PermissionError):
    """Code tried to act on another tenant for a caller that is not the platform (a bug)."""


@contextmanager
def platform_scope(tenant_id: str, purpose: str) -> Iterator[RequestContext]:
    """The explicit platform path: act on ``tenant_id`` for a platform admin or service.

    Everything inside (database transactions, outgoing calls) is bound to ``tenant_id``,
    exactly as if that tenant had called; RLS still applies. Allowed only when the
    verified caller is a platform admin or a platform service, and logged every time.
    """
    ctx = _current.get()
    caller = ctx.caller if ctx else None
    if ctx is None or caller is None or not caller.is_platform:
        raise PlatformScopeError(f"{purpose}: acting on tenant {tenant_id!r} needs a platform caller")
    if not is_valid_tenant_id(tenant_id):
        raise PlatformScopeError(f"{purpose}: not a tenant id: {tenant_id!r}")
    if tenant_id != ctx.tenant_id:
        log.info(
            "platform path %s: %s acts on tenant %s (request %s)", purpose, caller.subject, tenant_id, ctx.request_id
        )
    with bind(dataclasses.replace(ctx, tenant_id=tenant_id)) as scoped:
        yield scoped


@contextmanager
def system_scope(tenant_id: str, purpose: str, request_id: str = "") -> Iterator[RequestContext]:
    """Bind ``tenant_id`` for the platform's own bookkeeping, whoever the caller is.

    For the few reads a service makes on its own account, not a caller's: the tenant
    state behind every call, the public branding of a sign-in page. Data stays bound to
    that one tenant by RLS; the purpose is recorded in the context's ``method``.
    """
    if not is_valid_tenant_id(tenant_id):
        raise PlatformScopeError(f"{purpose}: not a tenant id: {tenant_id!r}")
    ctx = _current.get()
    scoped = (
        dataclasses.replace(ctx, tenant_id=tenant_id)
        if ctx is not None
        else RequestContext(request_id=request_id or "system", method=purpose, tenant_id=tenant_id)
    )
    with bind(scoped) as bound:
        yield bound


def background_context(service: str, purpose: str, request_id: str) -> RequestContext:
    """The context of work a service does on its own account (no caller): as the service.

    Its caller is the service itself, so :func:`platform_scope` accepts it, and every
    call it makes carries ``request_id`` for the logs of all services involved.
    """
    caller = Caller(
        subject=f"service:{service}", tenant_id=PLATFORM_TENANT, role="service", permissions=frozenset(), token="",
        service=True,
    )  # fmt: skip
    return RequestContext(request_id=request_id, method=purpose, caller=caller, tenant_id=PLATFORM_TENANT)
