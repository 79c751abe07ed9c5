"""Errors with google.rpc details (AIP-193), raised anywhere and sent once at the edge.

Handlers and interceptors raise :class:`ServiceError`; the outermost interceptor turns it
into a status with an ``ErrorInfo`` (UPPER_SNAKE reason, domain = the service) and, where
they apply, ``BadRequest`` field violations and ``RetryInfo``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2


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
    reason: str
    metadata: dict[str, str] = field(default_factory=dict)
    violations: Sequence[FieldViolation] = ()
    retry_after_seconds: float | None = None
    #: An audit event (``towerco.audit.v1.AuditEvent``) the error link records for this
    #: refusal, e.g. a cross-tenant attempt, in the targeted tenant's log.
    audit_event: object | None = field(default=None, repr=False)

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


# Constructors for the errors every service raises, so codes and reasons stay consistent.


def invalid_argument(violations: Sequence[FieldViolation], reason: str = "INVALID_ARGUMENT") -> ServiceError:
    names = ", ".join(v.field for v in violations)
    first = violations[0].description if violations else "invalid request"
    message = f"invalid {names}: {first}" if len(violations) == 1 else f"invalid fields: {names}"
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message, reason, violations=violations)


def not_found(resource: str, name: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        f"{resource} {name!r} not found",
        f"{resource.upper()}_NOT_FOUND",
        metadata={"resource": resource, "name": name},
    )


def already_exists(resource: str, name: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.ALREADY_EXISTS,
        f"{resource} {name!r} already exists",
        f"{resource.upper()}_ALREADY_EXISTS",
        metadata={"resource": resource, "name": name},
    )


def unauthenticated(message: str, reason: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, message, reason)


def permission_denied(message: str, reason: str, **metadata: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.PERMISSION_DENIED, message, reason, metadata=dict(metadata))


def unavailable(message: str, reason: str, retry_after_seconds: float = 1.0) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message, reason, retry_after_seconds=retry_after_seconds)


def failed_precondition(message: str, reason: str, **metadata: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, message, reason, metadata=dict(metadata))


def resource_exhausted(
    message: str, reason: str, retry_after_seconds: float | None = None, **metadata: str
) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        message,
        reason,
        metadata=dict(metadata),
        retry_after_seconds=retry_after_seconds,
    )
