"""Outgoing service-to-service calls carry the caller's tenant, token, request id, address and trace.

Every channel a service opens to another goes through :func:`service_channel`, whose
client interceptor copies the current request context onto the call. The callee sees
the same tenant and the same caller, so it can never be handed a wider scope.

A channel made with an ``identity`` calls as the platform service itself instead (its
own service token, no tenant header): for the internal contracts that only services
may call. The request id and the trace context (W3C ``traceparent``) still travel, so one
request can be followed everywhere, in the logs and as one trace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from . import context, tracing
from .identity import ServiceIdentity
from .tls import GrpcTls

#: What every channel to another service verifies it with (``GRPC_TLS_CA_FILE``); None: plaintext.
_credentials: grpc.ChannelCredentials | None = None


def configure(tls: GrpcTls) -> None:
    """Once at start-up: calls to other services use TLS if ``tls`` names a CA."""
    global _credentials
    _credentials = tls.channel_credentials()


def propagation_metadata(
    existing: Iterable[tuple[str, str | bytes]] | None, identity: ServiceIdentity | None = None
) -> list[tuple[str, str | bytes]]:
    """``existing`` without identity headers, plus those of the current request."""
    identity_headers = {"authorization", "x-tenant-id", "x-request-id", "x-forwarded-for", *tracing.TRACE_HEADERS}
    metadata = [(k, v) for k, v in (existing or ()) if k.lower() not in identity_headers]
    metadata.extend(tracing.outgoing())
    ctx = context.current()
    if ctx is not None:
        metadata.append(("x-request-id", ctx.request_id))
        if ctx.client_ip:
            # Believed by the callee only from a platform service (a call with ``identity``).
            metadata.append(("x-forwarded-for", ctx.client_ip))
    if identity is not None:
        metadata.append(("authorization", f"Bearer {identity.token()}"))
        return metadata
    if ctx is None:
        return metadata
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
    """Puts tenant, request id, trace context and the caller's token (or the service's) on every unary call."""

    def __init__(self, identity: ServiceIdentity | None = None) -> None:
        self._identity = identity

    async def intercept_unary_unary(
        self,
        continuation: Callable[[aio.ClientCallDetails, Any], Any],
        client_call_details: aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        details = aio.ClientCallDetails(
            method=client_call_details.method,
            timeout=client_call_details.timeout,
            metadata=aio.Metadata(*propagation_metadata(client_call_details.metadata, self._identity)),
            credentials=client_call_details.credentials,
            wait_for_ready=client_call_details.wait_for_ready,
        )
        return await continuation(details, request)


def service_channel(
    target: str, options: Sequence[tuple[str, Any]] = (), *, identity: ServiceIdentity | None = None
) -> aio.Channel:
    """A channel to another platform service: on behalf of the caller, or as ``identity``;
    over TLS once :func:`configure` was given a CA."""
    options = [("grpc.keepalive_time_ms", 30_000), *options]
    interceptors = [ContextPropagationInterceptor(identity)]
    if _credentials is not None:
        return aio.secure_channel(target, _credentials, options=options, interceptors=interceptors)  # type: ignore[arg-type]  # stubs lag grpc.aio
    return aio.insecure_channel(target, options=options, interceptors=interceptors)  # type: ignore[arg-type]  # stubs lag grpc.aio
