"""Request-scoped state: who is calling, for which tenant, under which request id.

Set by the interceptor chain for the duration of one call and reset when it ends, so
nothing leaks from one call into the next. Read by the data layer (to bind the tenant to
each transaction), by outgoing calls (to propagate it) and by logging.

The few ways code may act on a tenant other than the call's, or without one, are listed
in :data:`DOORS` at the end of this module: who may use each, what it reaches, and the
tests that prove it (``tests/test_tenant_doors.py`` holds the code to the table).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .ids import TENANT_ID

#: The reserved tenant whose `platform_admin` tokens administer the platform.
PLATFORM_TENANT = "platform"
PLATFORM_ADMIN_ROLE = "platform_admin"
#: The reserved tenants of the isolation canary (``services/runtime/canary.py``): no one can
#: create them, and no listing, usage or metric of tenants shows them.
CANARY_TENANTS = ("canary_a", "canary_b")


def is_valid_tenant_id(value: str) -> bool:
    return TENANT_ID.matches(value)


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
T = TypeVar("T")


class NoTenantError(RuntimeError):
    """Code tried to reach tenant data outside a tenant-bound request (a bug)."""


_FIELDS = frozenset(field.name for field in dataclasses.fields(RequestContext))


def derive(ctx: RequestContext, **changes: Any) -> RequestContext:
    """``dataclasses.replace(ctx, **changes)`` for the links every call passes: a copy of its fields.

    A fifth of replace's cost, which builds the arguments of ``__init__`` anew from every
    field (the class has no ``__post_init__`` to run again). Unknown fields are refused alike.
    """
    if not changes.keys() <= _FIELDS:
        raise TypeError(f"RequestContext has no field {', '.join(sorted(changes.keys() - _FIELDS))}")
    derived: RequestContext = object.__new__(RequestContext)
    values = derived.__dict__
    values.update(ctx.__dict__)
    values.update(changes)
    return derived


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


class Bound(Generic[T]):
    """``with Bound(var, value) as value:`` ``var`` is ``value`` in the block, and what it was after.

    A class, not a ``@contextmanager`` generator: the request path enters several per call
    (the request context three times), and this costs a fraction of a generator's frame.
    """

    __slots__ = ("_token", "_value", "_var")

    def __init__(self, var: ContextVar[T | None], value: T) -> None:
        self._var = var
        self._value = value

    def __enter__(self) -> T:
        self._token = self._var.set(self._value)
        return self._value

    def __exit__(self, *exc_info: object) -> None:
        self._var.reset(self._token)


def bind(ctx: RequestContext) -> Bound[RequestContext]:
    """Make ``ctx`` current for the enclosed block, restoring the previous one after."""
    return Bound(_current, ctx)


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
        # DEBUG: every tenant a platform admin creates and every batch a service moves passes
        # here; changes are in the audit log, and at INFO these lines buried everything else.
        log.debug(
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


@dataclass(frozen=True)
class Door:
    """A way for code to act on a tenant other than the call's, or without one (see :data:`DOORS`)."""

    #: Where it is defined: ``<module path>::<name>``.
    defined_in: str
    #: The only modules that may use it; a static test fails on any other (and on a stale entry).
    users: frozenset[str]
    #: What it checks before letting code through.
    guard: str
    #: What code inside it can see and do.
    reach: str
    #: The tests proving ``guard`` and ``reach`` (``<file>::<test>``); a test fails on a missing one.
    proven_by: tuple[str, ...]


_DOORS_TESTS = "tests/test_tenant_doors.py::"

#: Every way across tenants or around the call's tenant, in one place. Anything else reaches
#: data only through ``Database.transaction()``, bound to the tenant the interceptor chain
#: decided for the call, and RLS holds every statement to it.
DOORS: dict[str, Door] = {
    "bind": Door(
        defined_in="services/runtime/context.py::bind",
        users=frozenset(
            {
                "services/runtime/interceptors/request_id.py",  # the call's fresh context
                "services/runtime/interceptors/authentication.py",  # its caller
                "services/runtime/interceptors/tenant.py",  # its tenant: the per-request binding
                "services/runtime/audit.py",  # the relay, as a background_context
                "services/tenant/offboarding.py",  # as a background_context
                "services/tenant/tenant_data_migration.py",  # as a background_context
                "services/tenant/tenant_move.py",  # as a background_context
            }
        ),
        guard="none: it binds whatever context it is given, so only the chain's links and background work bind",
        reach="makes a context current for one block and restores the previous one after, even on an error",
        proven_by=(_DOORS_TESTS + "test_bind_restores_the_previous_context_when_the_block_ends",),
    ),
    "platform_scope": Door(
        defined_in="services/runtime/context.py::platform_scope",
        users=frozenset(
            {
                "services/tenant/servicer.py",  # tenants' lifecycle and settings, by platform admins
                "services/tenant/offboarding.py",
                "services/tenant/tenant_data_migration.py",
                "services/runtime/tenant_data_service.py",  # the internal copy and purge of a tenant's data
                "services/audit/servicer.py",  # VerifyChain of another tenant
                "services/features/registration.py",
                "services/features/servicer.py",  # plans and overrides set by platform admins
                "services/features/usage_recording.py",  # RecordUsage: a service's batch of one tenant's usage
                "services/features/usage_reports.py",  # GetUsage of another tenant, by platform admins
                "services/runtime/held_resources.py",  # counting a tenant's sites or users for the feature gate
                "services/tenant/sso_config.py",  # SignInSsoUser: a service signs a tenant's SSO user in
                "services/tenant/tenant_move.py",  # a moved tenant's audit events (MoveTenant)
                "services/tenant/custom_domains.py",  # Add/RemoveCustomDomain, by platform admins
            }
        ),
        guard="the verified caller is a platform admin or a platform service (a background_context is one); "
        "the tenant id is well formed",
        reach="binds the named tenant as if it had called: its transactions and outgoing calls; RLS still "
        "applies, so one tenant's rows at a time, never two",
        proven_by=(
            _DOORS_TESTS + "test_platform_scope_refuses_a_caller_that_is_not_the_platform",
            _DOORS_TESTS + "test_platform_scope_refuses_what_is_not_a_tenant_id",
            _DOORS_TESTS + "test_platform_scope_binds_only_the_named_tenant",
            "tests/test_tenant_data_service.py::test_end_user_tokens_are_refused",
        ),
    ),
    "system_scope": Door(
        defined_in="services/runtime/context.py::system_scope",
        users=frozenset(
            {
                "services/tenant/records.py",  # tenant state and settings behind every call (and cache repairs)
                "services/tenant/sso_config.py",  # a tenant's single sign-on configuration, for the services' caches
                "services/features/records.py",  # entitlements behind every call
                "services/features/usage_recording.py",  # the feature gate's own usage counts, flushed
                "services/runtime/audit.py",  # Auditor.record_alone: a refusal into its target's outbox
                "services/runtime/canary.py",  # the isolation canaries' sentinels and checks, as each canary
                "services/runtime/idempotency_purge.py",  # a tenant's expired idempotency records, deleted
            }
        ),
        guard="the tenant id is well formed; any caller, or none (the service's own bookkeeping, not the caller's)",
        reach="binds the named tenant to the block's transactions, keeping the caller: reads of one tenant's "
        "records, a refused call's audit event (the refusal tallies) written to the target's outbox, and the "
        "isolation canaries' sentinel rows, each written and checked as its own canary",
        proven_by=(
            _DOORS_TESTS + "test_system_scope_refuses_what_is_not_a_tenant_id",
            _DOORS_TESTS + "test_system_scope_binds_only_the_named_tenant_without_any_caller",
            "tests/test_audit_service.py::test_a_refused_cross_tenant_call_is_in_the_targets_log",
            "tests/test_canary.py::test_each_canary_sees_its_own_sentinels_and_none_of_the_other",
            "tests/test_idempotency_expiry.py::test_the_purge_removes_only_expired_records_of_each_tenant",
        ),
    ),
    "background_context": Door(
        defined_in="services/runtime/context.py::background_context",
        users=frozenset(
            {
                "services/runtime/audit.py",  # the audit relay
                "services/tenant/offboarding.py",  # deletions resumed at start-up
                "services/tenant/tenant_data_migration.py",  # migrations resumed at start-up
                "services/tenant/tenant_move.py",  # moves between cells, run and resumed in the background
            }
        ),
        guard="none: a service's own work, with no caller to check",
        reach="the service itself as caller, bound to the platform's tenant: no tenant's rows; a tenant only "
        "through platform_scope, and the audit outbox through outbox_transaction",
        proven_by=(
            _DOORS_TESTS + "test_background_context_is_the_service_bound_to_the_platform_tenant",
            _DOORS_TESTS + "test_background_context_without_a_tenant_reaches_no_tenant_rows",
            _DOORS_TESTS + "test_background_context_reaches_a_tenant_only_through_platform_scope",
        ),
    ),
    "rebind_tenant": Door(
        defined_in="services/runtime/db.py::Database.rebind_tenant",
        users=frozenset({"services/audit/servicer.py"}),  # WriteEvents: one batch, several tenants' logs
        guard="the caller is a platform service; the tenant id is well formed; the connection is in a "
        "transaction (the binding stays transaction-local)",
        reach="moves an open transaction to the named tenant: from then on it shows and accepts that tenant's "
        "rows only; logged (DEBUG) with its purpose",
        proven_by=(
            _DOORS_TESTS + "test_rebind_tenant_refuses_a_caller_that_is_not_a_platform_service",
            _DOORS_TESTS + "test_rebind_tenant_refuses_a_connection_outside_a_transaction",
            _DOORS_TESTS + "test_rebind_tenant_moves_the_transaction_to_the_named_tenant_only",
            _DOORS_TESTS + "test_rebind_tenant_is_logged_with_its_purpose",
            "tests/test_audit_service.py::test_end_user_tokens_cannot_write_events",
        ),
    ),
    "platform_read": Door(
        defined_in="services/runtime/db.py::Database.platform_read",
        users=frozenset(
            {
                "services/tenant/servicer.py",  # ListTenants, ResolveTenant
                "services/tenant/sso_config.py",  # LookupSsoIssuer: which tenant configured a token's issuer
                "services/tenant/offboarding.py",  # finding unfinished deletions at start-up
                "services/features/usage_reports.py",  # ListTenantUsage, the billing export
                "services/runtime/idempotency_purge.py",  # which tenants hold expired idempotency records
                "services/tenant/custom_domains.py",  # ListCustomDomains: the gateway's host map, to services
            }
        ),
        guard="none in code: what it reads decides who may ask (ListTenants and ListTenantUsage: platform "
        "admins only; which tenant serves a host name is public, ResolveTenant, and ListCustomDomains is for "
        "platform services; the idempotency purge is the service's own task)",
        reach="a READ ONLY transaction, no tenant bound: every tenant's rows in tables with a platform_read "
        "policy (the registry's tenants and host routes, the feature gate's hourly usage, the sites service's "
        "create_requests), none in any other table; nothing can be written",
        proven_by=(
            _DOORS_TESTS + "test_platform_read_cannot_write",
            _DOORS_TESTS + "test_platform_read_shows_every_tenant_only_in_the_directory_tables",
            _DOORS_TESTS + "test_platform_read_shows_every_tenants_usage_and_no_other_feature_gate_rows",
            "tests/test_usage_api.py::test_a_tenant_cannot_list_tenant_usage",
            "tests/test_idempotency_expiry.py::test_the_purge_removes_only_expired_records_of_each_tenant",
        ),
    ),
    "outbox_transaction": Door(
        defined_in="services/runtime/db.py::Database.outbox_transaction",
        users=frozenset({"services/runtime/audit.py"}),  # the audit relay
        guard="none in code: the relay runs it as a background_context",
        reach="no tenant bound: every tenant's events in audit_outbox may be read, locked and deleted, none "
        "added or changed; every other table shows no rows",
        proven_by=(
            _DOORS_TESTS + "test_outbox_transaction_reads_every_tenants_events",
            _DOORS_TESTS + "test_outbox_transaction_shows_no_tenant_rows_elsewhere",
            _DOORS_TESTS + "test_outbox_transaction_cannot_add_or_change_events",
        ),
    ),
}
