"""Errors with google.rpc details (AIP-193), raised anywhere and sent once at the edge.

Handlers and interceptors raise :class:`ServiceError`; the outermost interceptor turns it
into a status with an ``ErrorInfo`` (UPPER_SNAKE reason, domain = the service) and, where
they apply, ``BadRequest`` field violations and ``RetryInfo``.

Reasons come from the catalogue (``ErrorReason``, protos/towerco/api/v1/error_reason.proto):
the constructors below take an ``ErrorReason`` value, and a :class:`ServiceError` whose
code, metadata keys or RetryInfo differ from its reason's entry is refused when built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from . import error_catalogue
from .error_catalogue import ErrorReason as ErrorReason
from .error_catalogue import Reason as Reason


@dataclass(frozen=True)
class FieldViolation:
    """One bad field: its path in the request (``site.location.latitude``) and why."""

    field: str
    description: str


@dataclass
class ServiceError(Exception):
    """A request failed in a way the caller should be told about."""

    code: grpc.StatusCode
    message: str
    #: The ErrorInfo reason as sent: the name of an ``ErrorReason`` value.
    reason: str
    metadata: dict[str, str] = field(default_factory=dict)
    violations: Sequence[FieldViolation] = ()
    retry_after_seconds: float | None = None
    #: An audit event (``towerco.audit.v1.AuditEvent``) the error link records for this
    #: refusal, e.g. a cross-tenant attempt, in the targeted tenant's log.
    audit_event: object | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        error_catalogue.check(self.reason, self.code, self.metadata, self.retry_after_seconds is not None)

    def __str__(self) -> str:
        return f"{self.code.name} {self.reason}: {self.message}"

    def to_status(self, domain: str) -> status_pb2.Status:
        details: list[any_pb2.Any] = []
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=domain, metadata=self.metadata)
        details.append(_pack(info))
        if self.violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in self.violations
                ]
            )
            details.append(_pack(bad))
        if self.retry_after_seconds is not None:
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(max(1, int(self.retry_after_seconds * 1000)))
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=details)


def _pack(
    message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest | error_details_pb2.RetryInfo,
) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


# Constructors for the errors every service raises, one per status code; the reason is an
# ErrorReason value, and the catalogue checks it is sent with that code.


def invalid_argument(
    violations: Sequence[FieldViolation], reason: Reason = ErrorReason.INVALID_ARGUMENT
) -> ServiceError:
    names = ", ".join(v.field for v in violations)
    first = violations[0].description if violations else "invalid request"
    message = f"invalid {names}: {first}" if len(violations) == 1 else f"invalid fields: {names}"
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message, error_catalogue.name(reason), violations=violations)


def not_found(reason: Reason, name: str) -> ServiceError:
    """NOT_FOUND for the resource the reason names: ``SITE_NOT_FOUND`` is a site."""
    resource = _resource(reason, "_NOT_FOUND")
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        f"{resource} {name!r} not found",
        error_catalogue.name(reason),
        metadata={"resource": resource, "name": name},
    )


def already_exists(reason: Reason, name: str) -> ServiceError:
    """ALREADY_EXISTS for the resource the reason names: ``SITE_ALREADY_EXISTS`` is a site."""
    resource = _resource(reason, "_ALREADY_EXISTS")
    return ServiceError(
        grpc.StatusCode.ALREADY_EXISTS,
        f"{resource} {name!r} already exists",
        error_catalogue.name(reason),
        metadata={"resource": resource, "name": name},
    )


def _resource(reason: Reason, suffix: str) -> str:
    wire = error_catalogue.name(reason)
    if not wire.endswith(suffix):
        raise error_catalogue.CatalogueError(f"{wire} does not name a resource ending in {suffix}")
    return wire.removesuffix(suffix).lower()


def unauthenticated(message: str, reason: Reason) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, message, error_catalogue.name(reason))


def permission_denied(message: str, reason: Reason, **metadata: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.PERMISSION_DENIED, message, error_catalogue.name(reason), metadata=dict(metadata)
    )


def unavailable(message: str, reason: Reason, retry_after_seconds: float = 1.0) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        message,
        error_catalogue.name(reason),
        retry_after_seconds=retry_after_seconds,
    )


def failed_precondition(message: str, reason: Reason, **metadata: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION, message, error_catalogue.name(reason), metadata=dict(metadata)
    )


def aborted(message: str, reason: Reason) -> ServiceError:
    return ServiceError(grpc.StatusCode.ABORTED, message, error_catalogue.name(reason))


def resource_exhausted(
    message: str, reason: Reason, retry_after_seconds: float | None = None, **metadata: str
) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        message,
        error_catalogue.name(reason),
        metadata=dict(metadata),
        retry_after_seconds=retry_after_seconds,
    )


def quota_exceeded(tenant_id: str, resource: str, noun: str, count: int, limit: int, remedy: str) -> ServiceError:
    """RESOURCE_EXHAUSTED QUOTA_EXCEEDED: the tenant holds ``count`` ``noun``, its plan's ``resource`` limit.

    One wording for every quota (sites' ``max_sites``, users' ``max_users``): what is held, the
    limit, and ``remedy`` (what the tenant can do).
    """
    return resource_exhausted(
        f"tenant {tenant_id!r} has {count} {noun}, the most its plan allows ({limit}); "
        f"{remedy} or move to a larger plan",
        error_catalogue.ErrorReason.QUOTA_EXCEEDED,
        resource=resource,
        limit=str(limit),
        usage=str(count),
    )


def internal(message: str, reason: Reason, **metadata: str) -> ServiceError:
    """A defect; the services never answer INTERNAL on purpose."""
    return ServiceError(grpc.StatusCode.INTERNAL, message, error_catalogue.name(reason), metadata=dict(metadata))
