"""Outermost link: every failure leaves as a status with google.rpc details."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
import grpc
from grpc import aio
from grpc_status import rpc_status

from .. import context
from ..errors import ServiceError, unavailable
from ..policy import Policy
from .base import Behavior, Metadata, PolicyInterceptor

log = logging.getLogger("towerco.errors")

#: Database conditions a client should retry later, not report as bugs.
_RETRYABLE_DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


class ErrorDetailsInterceptor(PolicyInterceptor):
    """Turns :class:`ServiceError` and unexpected exceptions into rich statuses."""

    def wrap(self, inner: Behavior, policy: Policy, metadata: Metadata) -> Behavior:
        async def behavior(request: Any, ctx: aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await inner(request, ctx)
            except ServiceError as exc:
                await _abort(ctx, exc, policy)
            except aio.AbortError:
                raise
            except asyncpg.QueryCanceledError:
                await _abort(ctx, unavailable("the database took too long; retry later", "DATABASE_TIMEOUT"), policy)
            except (asyncpg.SerializationError, asyncpg.DeadlockDetectedError):
                error = ServiceError(
                    grpc.StatusCode.ABORTED, "concurrent change conflicted; retry the request", "CONCURRENT_CHANGE"
                )
                await _abort(ctx, error, policy)
            except _RETRYABLE_DB_ERRORS:
                log.warning("database unavailable for %s", policy.method, exc_info=True)
                await _abort(ctx, unavailable("the database is unavailable; retry later", "DATABASE_UNAVAILABLE"), policy)
            except Exception:
                current = context.current()
                request_id = current.request_id if current else ""
                log.exception("unexpected error in %s", policy.method)
                error = ServiceError(
                    grpc.StatusCode.INTERNAL,
                    f"internal error; quote request id {request_id} when reporting it",
                    "INTERNAL_ERROR",
                    metadata={"request_id": request_id},
                )
                await _abort(ctx, error, policy)

        return behavior


async def _abort(ctx: aio.ServicerContext[Any, Any], error: ServiceError, policy: Policy) -> None:
    status = rpc_status.to_status(error.to_status(policy.domain))
    trailing = tuple(status.trailing_metadata)
    if error.retry_after_seconds is not None:
        trailing += (("retry-after-ms", str(max(1, int(error.retry_after_seconds * 1000)))),)
    await ctx.abort(status.code, status.details, trailing)
