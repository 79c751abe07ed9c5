"""Which tenant a handler acts on when its request names one.

Reads and settings default to the call's tenant when the request leaves ``tenant_id``
empty. Naming another tenant is for the platform only (its admins and services); anyone
else is refused exactly as a mismatched ``x-tenant-id`` header is, and it is logged.
"""

from __future__ import annotations

import logging

from . import audit, context
from .errors import ErrorReason, FieldViolation, ServiceError, invalid_argument, permission_denied
from .ids import TENANT_ID

log = logging.getLogger("towerco.security")


def target_tenant(requested: str, field: str = "tenant_id", *, required: bool = False) -> str:
    """The tenant a request acts on: ``requested``, or the call's tenant when empty."""
    own = context.current_tenant()
    if not requested:
        if required:
            raise invalid_argument(
                [FieldViolation(field, "is required: name the tenant explicitly for this change")],
                reason=ErrorReason.TENANT_ID_REQUIRED,
            )
        return own
    if not context.is_valid_tenant_id(requested):
        raise invalid_argument([FieldViolation(field, TENANT_ID.problem)])
    if requested == own:
        return own
    caller = context.current_caller()
    if caller is not None and caller.is_platform:
        return requested
    raise cross_tenant_denied(own, requested)


def cross_tenant_denied(own: str, requested: str) -> ServiceError:
    """The refusal of a cross-tenant attempt: logged as a warning, audited in the target's log."""
    ctx = context.current()
    caller = ctx.caller if ctx else None
    method = ctx.method if ctx else "-"
    log.warning(
        "cross-tenant attempt denied: caller %s of tenant %s asked for tenant %s on %s",
        caller.subject if caller else "-",
        own,
        requested,
        method,
    )
    error = permission_denied(
        "the token's tenant does not match the requested tenant",
        ErrorReason.CROSS_TENANT_DENIED,
        token_tenant=own,
        requested_tenant=requested,
    )
    error.audit_event = audit.event(
        "security.cross_tenant_denied",
        f"tenants/{requested}",
        {"caller_tenant": own, "caller_user": caller.subject if caller else "", "method": method},
        outcome=audit.OUTCOME_DENIED,
        tenant_id=requested,
    )
    return error


def require_platform_admin() -> context.Caller:
    """The caller, if it is a platform admin; PERMISSION_DENIED otherwise."""
    caller = context.current_caller()
    if caller is None or not caller.is_platform_admin:
        raise permission_denied(
            "only the platform's administrators (tenant 'platform', role platform_admin) may do this",
            ErrorReason.PLATFORM_ADMIN_REQUIRED,
        )
    return caller
