"""Error-details link: every failure leaves as a status with google.rpc details.

The call is aborted once the failure is handled, outside the ``except`` blocks, so the
``AbortError`` grpc.aio keeps on the call's state (in a reference cycle with it) carries no
earlier exception and none of the frames that one passed through; the chain's outermost
frame drops the AbortError's own frames as it leaves (``base.py``). Each refusal left about
90 objects for the garbage collector before (README, *Floods straight to a service*).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import asyncpg
from grpc import aio
from grpc_status import rpc_status
from towerco.audit.v1.audit_log_service_pb2 import AuditEvent

from .. import context
from ..db import UNREACHABLE
from ..errors import ErrorReason, FieldViolation, ServiceError, aborted, internal, invalid_argument, unavailable
from ..policy import Policy, PolicyTable
from ..refusal_audit import RefusalAudit
from ..refusal_hold import RefusalHold
from ..validation import UNSTORABLE_TEXT, unstorable_text
from .base import Behavior, Metadata, PolicyInterceptor

log = logging.getLogger("towerco.errors")


class _Malformed:
    """Stands in for a request whose bytes are not a valid message."""


MALFORMED = _Malformed()


class ErrorDetailsInterceptor(PolicyInterceptor):
    """Turns :class:`ServiceError` and unexpected exceptions into rich statuses.

    A refusal that carries an audit event (a cross-tenant attempt) is handed to the
    refusal audit here, once the call is known to have failed: it tallies repeats and
    writes them once per window. A RESOURCE_EXHAUSTED refusal with a retry-after is held
    here (``hold``, ``refusal_hold.py``), outside every link that holds a slot for the call,
    so a held refusal occupies none of them (a call through the gateway is not held:
    ``refusal_hold.py``).
    """

    def __init__(
        self, policies: PolicyTable, refusals: RefusalAudit | None = None, hold: RefusalHold | None = None
    ) -> None:
        super().__init__(policies)
        self._refusals = refusals
        self._hold = hold

    def deserializer(self, original: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
        # gRPC would answer undecodable bytes with INTERNAL; they are the client's error.
        if original is None:
            return None

        def deserialize(data: bytes) -> Any:
            try:
                return original(data)
            except Exception:
                return MALFORMED

        return deserialize

    def wrap(self, inner: Behavior, policy: Policy, metadata: Metadata) -> Behavior:
        async def behavior(request: Any, ctx: aio.ServicerContext[Any, Any]) -> Any:
            failure: ServiceError
            try:
                if request is MALFORMED:
                    raise invalid_argument(
                        [FieldViolation("request", "is not a valid protobuf message for this method")],
                        reason=ErrorReason.MALFORMED_REQUEST,
                    )
                return await inner(request, ctx)
            except ServiceError as exc:
                if isinstance(exc.audit_event, AuditEvent) and self._refusals is not None:
                    self._refusals.note(exc.audit_event)
                if exc.retry_after_seconds is not None and self._hold is not None:
                    exc = await self._hold.hold(exc, ctx)
                failure = exc.with_traceback(None)
            except aio.AbortError:
                raise
            except asyncpg.QueryCanceledError:
                failure = unavailable("the database took too long; retry later", ErrorReason.DATABASE_TIMEOUT)
            except (asyncpg.SerializationError, asyncpg.DeadlockDetectedError):
                failure = aborted("concurrent change conflicted; retry the request", ErrorReason.CONCURRENT_CHANGE)
            except UNSTORABLE_TEXT as exc:  # a NUL from outside the request's fields (they are checked before)
                log.warning("text the database cannot store reached it in %s: %s", policy.method, exc)
                failure = unstorable_text()
            except UNREACHABLE:
                # Logged once per outage where it is met (Database.outage), not once per call.
                failure = unavailable("the database is unavailable; retry later", ErrorReason.DATABASE_UNAVAILABLE)
            except Exception:
                current = context.current()
                request_id = current.request_id if current else ""
                log.exception("unexpected error in %s", policy.method)
                failure = internal(
                    f"internal error; quote request id {request_id} when reporting it",
                    ErrorReason.INTERNAL_ERROR,
                    request_id=request_id,
                )
            # Aborted outside the handlers: the AbortError then drags no earlier exception (and
            # none of the frames it passed through) along as its context.
            await end_call(ctx, failure, policy)

        return behavior


async def end_call(ctx: aio.ServicerContext[Any, Any], error: ServiceError, policy: Policy) -> None:
    """Abort the call with ``error``'s status (a Trailers-Only reply: the gateway's penalty box
    reads a refusal's status from its headers)."""
    status = rpc_status.to_status(error.to_status(policy.domain))
    # abort() replaces the trailers: keep those already set (x-request-id).
    trailing = tuple(_trailers_set(ctx)) + tuple(status.trailing_metadata)
    if error.retry_after_seconds is not None:
        trailing += (("retry-after-ms", str(max(1, int(error.retry_after_seconds * 1000)))),)
    await ctx.abort(status.code, status.details, trailing)


def _trailers_set(ctx: aio.ServicerContext[Any, Any]) -> list[tuple[str, str | bytes]]:
    return [(k, v) for k, v in (ctx.trailing_metadata() or ()) if k != "grpc-status-details-bin"]
