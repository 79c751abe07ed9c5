"""Shutdown link: once the process is stopping, new calls are refused UNAVAILABLE, never CANCELLED.

Clients and Envoy retry UNAVAILABLE (Envoy on another host); CANCELLED says the caller
gave up, and nobody retries it. gRPC's own stop answers CANCELLED to every call that has
reached the server but is still waiting to be picked up by a handler, and to every call
that arrives before the client has read the GOAWAY (grpc/grpc#41785). So the server is
stopped only once no call is waiting to be picked up, in three steps
(:meth:`ShutdownGate.stop`):

1. refuse: each new call is answered at once, UNAVAILABLE ``SHUTTING_DOWN`` with a
   RetryInfo; the calls in flight go on, for up to the grace period.
2. hold: once they are done, new calls are held unanswered until none has arrived for a
   moment. A client then has all its calls held here and sends no more, so none waits
   inside gRPC to be picked up.
3. gRPC stops (GOAWAY on every connection, the port closed), and the held calls are
   answered UNAVAILABLE ``SHUTTING_DOWN``; a client calling again finds the port closed,
   UNAVAILABLE again.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from typing import Any

from grpc import aio

from ..errors import ErrorReason, unavailable
from ..policy import Policy, PolicyTable
from .base import Behavior, Metadata, PolicyInterceptor

log = logging.getLogger("towerco.server")


class _Phase(enum.Enum):
    SERVING = "serving"
    REFUSING = "refusing"
    HOLDING = "holding"
    STOPPED = "stopped"


class ShutdownGate(PolicyInterceptor):
    """Admits calls while serving; refuses (then holds, then refuses) them while stopping.

    ``quiet_seconds``: how long no call may have arrived before gRPC is stopped;
    ``hold_limit_seconds``: the longest calls are held waiting for that quiet (a client
    that keeps opening calls without waiting for answers never lets it come).
    """

    def __init__(
        self,
        policies: PolicyTable,
        *,
        retry_after_seconds: float = 1.0,
        quiet_seconds: float = 0.1,
        hold_limit_seconds: float = 1.0,
    ) -> None:
        super().__init__(policies)
        self._retry_after = retry_after_seconds
        self._quiet = quiet_seconds
        self._hold_limit = hold_limit_seconds
        self._phase = _Phase.SERVING
        self._in_flight = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._stopped = asyncio.Event()
        self._last_arrival = 0.0
        #: Calls answered SHUTTING_DOWN, reported when the server has stopped.
        self.refused = 0
        self._on_stopping: list[Callable[[], None]] = []

    def when_stopping(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` as soon as :meth:`stop` begins (held refusals are answered then)."""
        self._on_stopping.append(callback)

    def wrap(self, inner: Behavior, policy: Policy, metadata: Metadata) -> Behavior:
        async def behavior(request: Any, ctx: aio.ServicerContext[Any, Any]) -> Any:
            self._last_arrival = time.monotonic()
            if self._phase is _Phase.SERVING:
                return await self._admit(inner, request, ctx)
            if self._phase is _Phase.HOLDING:
                await self._stopped.wait()
            self.refused += 1
            raise unavailable(
                "the server is shutting down and did not run this call; retry it",
                ErrorReason.SHUTTING_DOWN,
                self._retry_after,
            )

        return behavior

    async def _admit(self, inner: Behavior, request: Any, ctx: aio.ServicerContext[Any, Any]) -> Any:
        self._in_flight += 1
        self._drained.clear()
        try:
            return await inner(request, ctx)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._drained.set()

    async def stop(self, server: aio.Server, grace_seconds: float) -> None:
        """Refuse new calls, let those in flight finish within the grace period, then stop ``server``."""
        deadline = time.monotonic() + grace_seconds
        self._phase = _Phase.REFUSING
        for callback in self._on_stopping:
            callback()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), grace_seconds)
        self._phase = _Phase.HOLDING
        hold_until = min(deadline, time.monotonic() + self._hold_limit)
        confirmed = False
        while True:
            now = time.monotonic()
            quiet_in = self._last_arrival + self._quiet - now
            if now >= hold_until or (quiet_in <= 0 and confirmed):
                break
            # Quiet counts once the event loop has had one more turn: calls gRPC took in
            # while this process was short of CPU are seen here before it is trusted.
            confirmed = quiet_in <= 0
            await asyncio.sleep(self._quiet / 5 if confirmed else min(quiet_in, hold_until - now))
        # What is still in flight past the grace period is cancelled by gRPC; the held
        # calls need only a moment to be answered.
        stopping = asyncio.ensure_future(server.stop(max(deadline - time.monotonic(), 0.5)))
        # gRPC's stop begins at once (GOAWAY sent, the port closed); a moment more lets the
        # GOAWAY leave before the answers, so no client sends another call on its connection.
        await asyncio.sleep(self._quiet / 5)
        self._phase = _Phase.STOPPED
        self._stopped.set()
        await stopping
        if self.refused:
            log.info("refused %d calls while shutting down (UNAVAILABLE SHUTTING_DOWN)", self.refused)
