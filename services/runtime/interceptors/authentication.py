"""Authentication link: verify the bearer token and record the caller."""

from __future__ import annotations

from typing import Any

from grpc import aio

from .. import context
from ..auth import ProviderUnavailableError, TokenError, TokenVerifier, bearer_token
from ..errors import ErrorReason, unauthenticated, unavailable
from ..policy import Policy, PolicyTable
from .base import Behavior, Metadata, PolicyInterceptor


class AuthenticationInterceptor(PolicyInterceptor):
    """UNAUTHENTICATED unless a valid token comes with the call (public RPCs excepted)."""

    reads_metadata = True

    def __init__(self, policies: PolicyTable, verifier: TokenVerifier) -> None:
        super().__init__(policies)
        self._verifier = verifier

    def wrap(self, inner: Behavior, policy: Policy, metadata: Metadata) -> Behavior:
        async def behavior(request: Any, ctx: aio.ServicerContext[Any, Any]) -> Any:
            header = metadata.single("authorization")
            if header is None:
                if policy.public:
                    return await inner(request, ctx)
                raise unauthenticated(
                    "a bearer token is required (authorization: Bearer <JWT>)", ErrorReason.TOKEN_MISSING
                )
            token = bearer_token(header)
            if token is None:
                raise unauthenticated("authorization must be 'Bearer <JWT>'", ErrorReason.TOKEN_MISSING)
            try:
                caller = await _verify(self._verifier, token)
            except TokenError as exc:
                raise unauthenticated(str(exc), ErrorReason.Value(exc.reason)) from None
            except ProviderUnavailableError as exc:
                raise unavailable(f"{exc}; retry shortly", ErrorReason.IDENTITY_PROVIDER_UNAVAILABLE) from None
            current = context.current()
            assert current is not None, "RequestContextInterceptor must run first"
            with context.bind(context.derive(current, caller=caller)):
                return await inner(request, ctx)

        return behavior


async def _verify(verifier: TokenVerifier, token: str) -> context.Caller:
    # A cached token is a dictionary hit; only a first sighting pays for the signature check,
    # and a JWKS URL fetch must never block the event loop. A tenant issuer's token is first
    # looked up (which tenant, whether it is still configured and entitled: in memory mostly).
    await verifier.prepare(token)
    try:
        return verifier.verify_cached(token)
    except KeyError:
        return await verifier.verify_signed_in(token)
