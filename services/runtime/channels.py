"""Outgoing service-to-service calls carry the caller's tenant, token and request id.

Every channel a service opens to another goes through :func:`service_channel`, whose
client interceptor copies the current request context onto the call. The callee sees
the same tenant and the same caller, so it can never be handed a wider scope.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from grpc import aio

from . import context


def propagation_metadata(existing: Iterable[tuple[str, str | bytes]] | None) -> list[tuple[str, str | bytes]]:
    """``existing`` without identity headers, plus those of the current request."""
    identity = {"authorization", "x-tenant-id", "x-request-id"}
    metadata = [(k, v) for k, v in (existing or ()) if k.lower() not in identity]
    ctx = context.current()
    if ctx is None:
        return metadata
    metadata.append(("x-request-id", ctx.request_id))
    if ctx.tenant_id is not None:
        metadata.append(("x-tenant-id", ctx.tenant_id))
    if ctx.caller is not None:
        metadata.append(("authorization", f"Bearer {ctx.caller.token}"))
    return metadata


if TYPE_CHECKING:
    _ClientInterceptor = aio.UnaryUnaryClientInterceptor[Any, Any]
else:
    _ClientInterceptor = aio.UnaryUnaryClientInterceptor


class ContextPropagationInterceptor(_ClientInterceptor):
    """Puts tenant, request id and the caller's token on every unary call."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[[aio.ClientCallDetails, Any], Any],
        client_call_details: aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        details = aio.ClientCallDetails(
            method=client_call_details.method,
            timeout=client_call_details.timeout,
            metadata=aio.Metadata(*propagation_metadata(client_call_details.metadata)),
            credentials=client_call_details.credentials,
            wait_for_ready=client_call_details.wait_for_ready,
        )
        return await continuation(details, request)


def service_channel(target: str, options: Sequence[tuple[str, Any]] = ()) -> aio.Channel:
    """A channel to another platform service that propagates the request context."""
    return aio.insecure_channel(
        target,
        options=[("grpc.keepalive_time_ms", 30_000), *options],
        interceptors=[ContextPropagationInterceptor()],  # type: ignore[list-item]  # stubs lag grpc.aio
    )
