"""What every server interceptor shares: find the method's policy, wrap its behaviour.

Each link wraps the unary behaviour of the handler the rest of the chain returns, so its
code runs around the handler in the handler's own task: context variables it sets are
seen by everything inside it and are reset when the call ends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
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
    _GenericHandler = grpc.GenericRpcHandler[Any, Any]
else:
    _ServerInterceptor = aio.ServerInterceptor
    _GenericHandler = grpc.GenericRpcHandler


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def call_status(ctx: aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    """The status a call ends with once its behaviour returned or aborted: the one set on
    its context (by ``ctx.abort``, as the error link ends a failed call, or ``set_code``),
    else OK."""
    code: Any = ctx.code()
    if code is None:
        return grpc.StatusCode.OK
    if isinstance(code, grpc.StatusCode):
        return code
    return _CODES.get(code, grpc.StatusCode.UNKNOWN)


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


class Chain:
    """The links of a chain around each servicer method, made once when the method is registered.

    No grpc.aio interceptor runs: grpc.aio would await an interceptor for every call (its
    own coroutines, and a new handler each time a link wraps per call). Here each method's
    handler is wrapped when the servicer registers it (:meth:`registering`): the links wrap
    its behaviour innermost first, the request deserializers are composed, and the handler
    gRPC finds for a call is that one, every time. What runs in the call, and in which
    order, is what the links as separate interceptors run.

    A link that reads the call's metadata (``reads_metadata``) is handed :data:`CALL_METADATA`,
    which reads the running call's: the outermost layer reads ``ctx.invocation_metadata()``
    once per call, for all of them. Methods without a policy are not registered (gRPC answers
    UNIMPLEMENTED: fail closed), except health and reflection, which pass untouched. All
    links share one policy table.
    """

    def __init__(self, links: Sequence[PolicyInterceptor]) -> None:
        if not links or any(link._policies is not links[0]._policies for link in links):
            raise ValueError("the links of one chain share one policy table")
        self.links = tuple(links)
        self._inner_first = tuple(reversed(self.links))
        self._policies = links[0]._policies
        self._reads = any(link.reads_metadata for link in self.links)

    def handler(self, method: str, handler: Handler | None) -> Handler | None:
        """What to serve ``method`` with: ``handler`` inside every link; None: not served."""
        if handler is None:
            return None
        policy = self._policies.get(method)
        if policy is None or handler.unary_unary is None:
            return handler if method.startswith(INFRASTRUCTURE_PREFIXES) else None
        servicer = cast(Behavior, handler.unary_unary)
        behavior = servicer
        deserializer = handler.request_deserializer
        for link in self._inner_first:
            behavior = link.wrap(behavior, policy, CALL_METADATA if link.reads_metadata else UNREAD)
            deserializer = link.deserializer(deserializer)
        if self._reads:
            behavior = _reading_metadata(behavior)
        return grpc.unary_unary_rpc_method_handler(
            behavior, request_deserializer=deserializer, response_serializer=handler.response_serializer
        )

    def registering(self, server: aio.Server) -> aio.Server:
        """``server`` as a servicer's ``add_..._to_server`` is handed it: what it registers is chained."""
        return cast(aio.Server, _Registering(server, self))


class _CallMetadata(Metadata):
    """The running call's metadata, read when a link's behaviour asks (see :class:`Chain`)."""

    def __init__(self) -> None:
        super().__init__(())

    def first(self, key: str) -> str | None:
        return _running().first(key)

    def single(self, key: str) -> str | None:
        return _running().single(key)


#: What a link reading the call's metadata is handed by :class:`Chain`.
CALL_METADATA: Metadata = _CallMetadata()
_call_metadata: ContextVar[Metadata | None] = ContextVar("towerco_call_metadata", default=None)


def _running() -> Metadata:
    read = _call_metadata.get()
    if read is None:
        raise RuntimeError("a link read the call's metadata outside its behaviour (a link wraps once per method)")
    return read


def _reading_metadata(inner: Behavior) -> Behavior:
    """``inner`` with the call's metadata read once, for every link, for the call's length."""

    async def behavior(request: Any, ctx: aio.ServicerContext[Any, Any]) -> Any:
        token = _call_metadata.set(Metadata(ctx.invocation_metadata() or ()))
        try:
            return await inner(request, ctx)
        except aio.AbortError as aborted:
            # grpc.aio keeps the AbortError on the call's state, in a reference cycle: without
            # the chain's frames in its traceback, they are freed when the call ends, not left
            # for the garbage collector.
            raise aborted.with_traceback(None) from None
        finally:
            _call_metadata.reset(token)

    return behavior


class _Chained(_GenericHandler):
    """A generic handler's methods, chained: each method's handler is wrapped once and kept."""

    def __init__(self, inner: _GenericHandler, chain: Chain) -> None:
        self._inner = inner
        self._chain = chain
        #: Per method: the handler the inner one last gave, and its chained handler.
        self._kept: dict[str, tuple[Handler | None, Handler | None]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        handler = self._inner.service(handler_call_details)
        method = handler_call_details.method
        kept = self._kept.get(method)
        if kept is not None and kept[0] is handler:
            return kept[1]
        chained = self._chain.handler(method, handler)
        self._kept[method] = (handler, chained)
        return chained


class _Registering:
    """A server whose servicers' methods are registered chained; anything else is the server's."""

    def __init__(self, server: aio.Server, chain: Chain) -> None:
        self._server = server
        self._chain = chain

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[_GenericHandler]) -> None:
        self._server.add_generic_rpc_handlers([_Chained(handler, self._chain) for handler in generic_rpc_handlers])

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict[str, Handler]) -> None:
        chained = {}
        for name, handler in method_handlers.items():
            found = self._chain.handler(f"/{service_name}/{name}", handler)
            if found is not None:
                chained[name] = found
        self._server.add_registered_method_handlers(service_name, chained)  # type: ignore[attr-defined]  # not in the stubs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)
