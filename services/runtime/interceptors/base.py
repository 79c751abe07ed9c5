"""What every server interceptor shares: find the method's policy, wrap its behaviour.

Each link wraps the unary behaviour of the handler the rest of the chain returns, so its
code runs around the handler in the handler's own task: context variables it sets are
seen by everything inside it and are reset when the call ends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias, cast

import grpc
from grpc import aio

from ..errors import ErrorReason, FieldViolation, invalid_argument
from ..policy import Policy, PolicyTable

Behavior: TypeAlias = "Callable[[Any, aio.ServicerContext[Any, Any]], Awaitable[Any]]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"

if TYPE_CHECKING:
    _ServerInterceptor = aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = aio.ServerInterceptor


class Metadata:
    """A call's text metadata. Identity headers must appear at most once."""

    def __init__(self, pairs: Any) -> None:
        self._values: dict[str, list[str]] = {}
        for key, value in pairs:
            if isinstance(value, str):
                self._values.setdefault(key.lower(), []).append(value)

    @classmethod
    def of(cls, pairs: Any) -> Metadata:
        """``pairs`` read once for all the links of a call: each link is handed the same pairs object.

        The last call's reading is kept with its pairs (alive, so no other call's can have
        its identity); a different object is read anew. Links only read a Metadata.
        """
        global _last_read
        pairs_read, read = _last_read
        if pairs is not pairs_read:
            read = cls(pairs)
            _last_read = (pairs, read)
        return read

    def first(self, key: str) -> str | None:
        """The first value of ``key`` (for headers that identify nothing), None when absent."""
        values = self._values.get(key)
        return values[0] if values else None

    def single(self, key: str) -> str | None:
        """The one value of ``key``, None when absent; INVALID_ARGUMENT when repeated."""
        values = self._values.get(key)
        if not values:
            return None
        if len(values) > 1:
            raise invalid_argument(
                [FieldViolation(f"metadata.{key}", f"{key} must be sent at most once")],
                reason=ErrorReason.METADATA_REPEATED,
            )
        return values[0]


_last_read: tuple[Any, Metadata] = ((), Metadata(()))


class _Unread(Metadata):
    """What a link that does not read the call's metadata is handed: reading it is a bug."""

    def __init__(self) -> None:
        super().__init__(())

    def first(self, key: str) -> str | None:
        raise RuntimeError(f"a link read {key!r}: a link reading the call's metadata sets reads_metadata = True")

    single = first


UNREAD: Metadata = _Unread()

#: Platform plumbing served without a token: health checks and server reflection.
INFRASTRUCTURE_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


class PolicyInterceptor(_ServerInterceptor, ABC):
    """A link that only concerns RPCs with a declared policy (all Towerco RPCs).

    Health and reflection pass straight through. Any other method without a policy is
    answered as if it did not exist (UNIMPLEMENTED): fail closed, never open.

    A link whose :meth:`wrap` depends on the method alone, not on the call's metadata
    (``reads_metadata`` False), wraps each method's handler once: while the handler the
    links inside it return is the same object (they too wrapped it once), the kept
    wrapping is returned, and the call's metadata is not read for it.
    """

    #: Whether :meth:`wrap` reads the call's metadata (then it wraps anew for every call).
    reads_metadata: ClassVar[bool] = False

    def __init__(self, policies: PolicyTable) -> None:
        self._policies = policies
        #: Per method: the handler last wrapped, and its wrapping.
        self._kept: dict[str, tuple[Handler, Handler]] = {}
        #: Per method: the behaviour last wrapped, and its wrapping (when run by :class:`Linked`).
        self._kept_behaviors: dict[str, tuple[Behavior, Behavior]] = {}

    async def intercept_service(  # type: ignore[override]  # None is how gRPC says "no such method"
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        policy = self._policies.get(method)
        if handler is None:
            return None
        if policy is None or handler.unary_unary is None:
            return handler if method.startswith(INFRASTRUCTURE_PREFIXES) else None
        if self.reads_metadata:
            return self._wrapped(handler, policy, Metadata.of(handler_call_details.invocation_metadata or ()))
        kept = self._kept.get(method)
        if kept is not None and kept[0] is handler:
            return kept[1]
        wrapped = self._wrapped(handler, policy, UNREAD)
        self._kept[method] = (handler, wrapped)
        return wrapped

    def behavior(self, inner: Behavior, policy: Policy, details: grpc.HandlerCallDetails) -> Behavior:
        """This link's behaviour around ``inner`` for a call, as :meth:`intercept_service` wraps it (:class:`Linked`).

        Kept per method, like the handler, when the link does not read the call's metadata.
        """
        if self.reads_metadata:
            return self.wrap(inner, policy, Metadata.of(details.invocation_metadata or ()))
        kept = self._kept_behaviors.get(policy.method)
        if kept is not None and kept[0] is inner:
            return kept[1]
        wrapped = self.wrap(inner, policy, UNREAD)
        self._kept_behaviors[policy.method] = (inner, wrapped)
        return wrapped

    def _wrapped(self, handler: Handler, policy: Policy, metadata: Metadata) -> Handler:
        inner = cast(Behavior, handler.unary_unary)
        wrapped = self.wrap(inner, policy, metadata)
        deserializer = self.deserializer(handler.request_deserializer)
        if wrapped is inner and deserializer is handler.request_deserializer:
            return handler  # the link has nothing to add to this method
        return grpc.unary_unary_rpc_method_handler(
            wrapped, request_deserializer=deserializer, response_serializer=handler.response_serializer
        )

    def deserializer(self, original: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
        """The request deserializer to use; links that care about it override this."""
        return original

    @abstractmethod
    def wrap(self, inner: Behavior, policy: Policy, metadata: Metadata) -> Behavior:
        """Return the behaviour that runs this link's check around ``inner``."""


class Linked(_ServerInterceptor):
    """The links of a chain as one grpc.aio interceptor, each link's wrapping a plain call.

    grpc.aio awaits each interceptor's ``intercept_service`` in turn, one coroutine (and one
    of its own) per link and call, and each link makes a handler of its own. Here the method
    is looked up once, the links wrap its behaviour innermost first (:meth:`PolicyInterceptor.behavior`,
    the same wrappings, kept per method as each link keeps them), the request deserializers are
    composed once per method, and one handler is made for the call. What runs in the call, and
    in which order, is what the links as separate interceptors run. All links share one policy table.
    """

    def __init__(self, links: Sequence[PolicyInterceptor]) -> None:
        if not links or any(link._policies is not links[0]._policies for link in links):
            raise ValueError("the links of one chain share one policy table")
        self.links = tuple(links)
        self._inner_first = tuple(reversed(self.links))
        self._policies = links[0]._policies
        #: Per method: the deserializer the links were given, and theirs.
        self._deserializers: dict[str, tuple[Callable[[bytes], Any] | None, Callable[[bytes], Any] | None]] = {}

    async def intercept_service(  # type: ignore[override]  # None is how gRPC says "no such method"
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        policy = self._policies.get(method)
        if policy is None or handler.unary_unary is None:
            return handler if method.startswith(INFRASTRUCTURE_PREFIXES) else None
        servicer = cast(Behavior, handler.unary_unary)
        behavior = servicer
        for link in self._inner_first:
            behavior = link.behavior(behavior, policy, handler_call_details)
        deserializer = self._deserializer(method, handler.request_deserializer)
        if behavior is servicer and deserializer is handler.request_deserializer:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            behavior, request_deserializer=deserializer, response_serializer=handler.response_serializer
        )

    def _deserializer(self, method: str, original: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
        kept = self._deserializers.get(method)
        if kept is not None and kept[0] is original:
            return kept[1]
        composed = original
        for link in self._inner_first:
            composed = link.deserializer(composed)
        self._deserializers[method] = (original, composed)
        return composed
