"""Which tenant a token issuer signs in for: the tenants' SSO configurations, as verifiers need them.

The verifier (:class:`~services.runtime.auth.TokenVerifier`) asks synchronously, by issuer;
:meth:`SsoIssuers.prepare`, awaited by the authentication link before each verification,
makes sure its answer is current:

- issuer -> tenant comes from the registry (``LookupSsoIssuer``) and is kept in memory; an
  issuer no tenant configured is remembered as such for ``unknown_seconds`` only;
- the tenant's configuration itself is read through the tenant cache (kind ``sso``), so the
  registry's change notice for the tenant drops it in every process at once: a removed or
  changed configuration is seen at the next call, and if it no longer names the issuer the
  issuer is looked up again;
- a tenant whose entitlements lack ``sso`` (a downgraded plan, an override) has its
  configuration kept but not honoured: its tokens are refused as an unknown issuer's.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import jwt
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from towerco.internal.v1 import sso_issuers_pb2, sso_issuers_pb2_grpc

from . import error_catalogue
from .auth import TenantIssuer
from .context import Caller
from .entitlements import EntitlementDirectory
from .errors import ErrorReason, ServiceError, failed_precondition, resource_exhausted, unavailable
from .identity import ServiceIdentity
from .lookups import InternalLookup
from .tenant_cache import TenantCache, Versioned

SSO_KIND = "sso"
FEATURE = "sso"


def sso_value(issuer: TenantIssuer | None) -> dict[str, Any] | None:
    """A tenant's configuration as the tenant cache holds it (None: it has none)."""
    if issuer is None:
        return None
    return {
        "issuer": issuer.issuer,
        "audience": issuer.audience,
        "email_claim": issuer.email_claim,
        "groups_claim": issuer.groups_claim,
        "group_roles": [list(pair) for pair in issuer.group_roles],
    }


def issuer_from_value(tenant_id: str, value: dict[str, Any] | None) -> TenantIssuer | None:
    if not value:
        return None
    return TenantIssuer(
        tenant_id=tenant_id,
        issuer=str(value["issuer"]),
        audience=str(value["audience"]),
        email_claim=str(value["email_claim"]),
        groups_claim=str(value["groups_claim"]),
        group_roles=tuple((str(group), str(role)) for group, role in value["group_roles"]),
    )


def issuer_from_reply(reply: sso_issuers_pb2.SsoIssuer) -> TenantIssuer | None:
    if not reply.issuer:
        return None
    return TenantIssuer(
        tenant_id=reply.tenant_id,
        issuer=reply.issuer,
        audience=reply.audience,
        email_claim=reply.email_claim,
        groups_claim=reply.groups_claim,
        group_roles=tuple((pair.group, pair.role) for pair in reply.group_roles),
    )


#: The tenant that configured an issuer (None: nobody).
IssuerLookup = Callable[[str], Awaitable[TenantIssuer | None]]
#: A tenant's configuration at its version (for the tenant cache).
TenantSsoSource = Callable[[str], Awaitable[Versioned]]
#: (tenant, issuer, email, role) -> the registry user id a sign-in stands for.
SignIn = Callable[[str, str, str, str], Awaitable[str]]


def relayed(exc: grpc.aio.AioRpcError) -> ServiceError:
    """The registry's refusal of a sign-in, passed on to the caller as it was made (code, reason,
    metadata); a registry out of reach is UNAVAILABLE, never an internal error."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if not detail.Unpack(info) or info.reason not in error_catalogue.CATALOGUE:
            continue
        reason, metadata = ErrorReason.Value(info.reason), dict(info.metadata)
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # QUOTA_EXCEEDED: max_users reached
            return resource_exhausted(exc.details() or "", reason, **metadata)
        if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:  # SSO_ISSUER_CHANGED
            return failed_precondition(exc.details() or "", reason, **metadata)
    return unavailable(
        "the tenant registry cannot sign this user in now; retry shortly", ErrorReason.TENANT_DIRECTORY_UNAVAILABLE
    )


class RegistrySsoSource(InternalLookup):
    """Asks the registry's SsoIssuerDirectoryService, as this service."""

    def __init__(self, target: str, identity: ServiceIdentity, timeout: float = 2.0) -> None:
        super().__init__(target, identity, timeout)
        self._stub = sso_issuers_pb2_grpc.SsoIssuerDirectoryServiceStub(self.channel)

    async def by_issuer(self, issuer: str) -> TenantIssuer | None:
        reply = await self.ask(self._stub.LookupSsoIssuer, sso_issuers_pb2.LookupSsoIssuerRequest(issuer=issuer))
        return None if reply is None else issuer_from_reply(reply)

    async def sign_in(self, tenant_id: str, issuer: str, email: str, role: str) -> str:
        """The user id of the tenant's user with this email (made on its first sign-in)."""
        request = sso_issuers_pb2.SignInSsoUserRequest(tenant_id=tenant_id, issuer=issuer, email=email, role=role)
        try:
            reply = await self._stub.SignInSsoUser(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise relayed(exc) from None
        return reply.user_id

    async def of_tenant(self, tenant_id: str) -> Versioned:
        request = sso_issuers_pb2.GetTenantSsoRequest(tenant_id=tenant_id)
        reply = await self.ask(self._stub.GetTenantSso, request)
        if reply is None:
            return Versioned(0, None)
        return Versioned(reply.version, sso_value(issuer_from_reply(reply)))


class SsoIssuers:
    """issuer -> :class:`TenantIssuer`, current for each call; the verifier's ``tenant_issuers``."""

    def __init__(
        self,
        platform_issuers: frozenset[str],
        cache: TenantCache,
        by_issuer: IssuerLookup,
        of_tenant: TenantSsoSource,
        sign_in: SignIn,
        entitlements: EntitlementDirectory,
        *,
        unknown_seconds: float = 1.0,
        size: int = 10_000,
    ) -> None:
        self._platform = platform_issuers
        self._cache = cache
        self._by_issuer = by_issuer
        self._of_tenant = of_tenant
        self._sign_in = sign_in
        self._entitlements = entitlements
        self._unknown_seconds = unknown_seconds
        self._size = size
        #: issuer -> (tenant id or None for nobody, until when a "nobody" holds)
        self._tenants: OrderedDict[str, tuple[str | None, float]] = OrderedDict()
        #: What the verifier is told now, per issuer.
        self._ready: dict[str, TenantIssuer | None] = {}

    def __call__(self, issuer: str) -> TenantIssuer | None:
        return self._ready.get(issuer)

    async def sign_in(self, caller: Caller, issuer: TenantIssuer) -> Caller:
        """The caller as the tenant's registry user: its deactivation and role then reach the token."""
        user_id = await self._sign_in(issuer.tenant_id, issuer.issuer, caller.subject, caller.role)
        return dataclasses.replace(caller, subject=user_id)

    async def prepare(self, token: str, issuer: str | None = None) -> None:
        """Bring what the token's issuer stands for now into memory, for the verification that
        follows; ``issuer``: the one a token verified before named (not decoded again: ~30 us)."""
        if issuer is None:
            try:
                issuer = jwt.decode(token, options={"verify_signature": False}).get("iss")
            except jwt.PyJWTError:
                return  # the verifier refuses it as malformed
        if not isinstance(issuer, str) or issuer in self._platform or len(issuer) > 512:
            return
        try:
            self._ready[issuer] = await self._current(issuer)
        except ServiceError:
            raise
        except Exception:
            # The registry (or its cache) out of reach: the token may be good, so retry, never INTERNAL.
            raise unavailable(
                "the tenant registry cannot be reached to look this token's issuer up; retry shortly",
                ErrorReason.TENANT_DIRECTORY_UNAVAILABLE,
            ) from None
        if len(self._ready) > self._size:
            self._ready.pop(next(iter(self._ready)))

    async def _current(self, issuer: str) -> TenantIssuer | None:
        for attempt in range(2):
            tenant_id = await self._tenant_of(issuer, fresh=attempt > 0)
            if tenant_id is None:
                return None
            item = await self._cache.get(tenant_id, SSO_KIND, lambda t=tenant_id: self._of_tenant(t))  # type: ignore[misc]
            config = issuer_from_value(tenant_id, item.value)
            if config is not None and config.issuer == issuer:
                entitlements = await self._entitlements.get(tenant_id)
                return config if entitlements is not None and FEATURE in entitlements.features else None
            self._tenants.pop(issuer, None)  # the tenant no longer has it: ask who has it now
        return None

    async def _tenant_of(self, issuer: str, *, fresh: bool) -> str | None:
        known = self._tenants.get(issuer)
        now = time.monotonic()
        if known is not None and not fresh and (known[0] is not None or now < known[1]):
            self._tenants.move_to_end(issuer)
            return known[0]
        found = await self._by_issuer(issuer)
        tenant_id = found.tenant_id if found is not None else None
        self._tenants[issuer] = (tenant_id, now + self._unknown_seconds)
        self._tenants.move_to_end(issuer)
        if len(self._tenants) > self._size:
            self._tenants.popitem(last=False)
        return tenant_id
