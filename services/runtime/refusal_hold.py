"""Held refusals: a refusal that says "retry in X" is answered no sooner than it must be.

A RESOURCE_EXHAUSTED refusal with a retry-after (``RATE_LIMITED``, ``TENANT_CALLS_LIMIT``,
``TENANT_CONCURRENCY_LIMIT``) costs this process little in our code, but each refused call
still costs grpc.aio's own per-call work, and a client that calls again the instant it is
answered (a closed loop, a retry storm) sends more the faster it is refused: refused in
microseconds, 32 such callers send thousands of calls a second and fill the cores the other
tenants need. So the error link (and the standing-refusal link) holds such a refusal before
sending it, for a random time between its retry-after and twice it (between half of
``REFUSAL_HOLD_MAX_MS`` and all of it when the retry-after is longer), and never past the
call's remaining deadline less :data:`DEADLINE_MARGIN_SECONDS`; its RetryInfo,
``retry-after-ms`` and message then give the wait that remains (1 ms at least). The random
time spreads the callers that were told the same slot: held to the slot exactly, 32
closed-loop callers came back at the same instant, and each burst of 32 refusals held the
event loop for about 25 ms. A client waits at most one more wait than it had to (only one
of those callers can have the slot anyway); a closed loop of N callers is paced to about N
calls per hold.

The hold starts once every link inside the error link has let go of what it held (the
tenant's in-flight slot, its database slot, the shutdown gate's count of calls in flight):
a held refusal holds nothing but its own call. At most ``REFUSAL_HOLD_MAX_HELD`` are held at
once per process; past that a refusal is answered at once. Once the process is stopping
(:meth:`RefusalHold.release`, called by the shutdown gate) held refusals are answered at
once and no more are held. Never held: UNAVAILABLE (shutdown, the rate limiter unreachable),
any refusal without a retry-after, and a call through the gateway (its penalty box holds
those).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
from typing import Any

import grpc
from grpc import aio

from . import context, metrics
from .errors import ServiceError
from .settings import REFUSAL_HOLD_MAX_HELD, REFUSAL_HOLD_MAX_MS

#: What a call's deadline keeps after the hold, for its refusal to reach the caller in time.
DEADLINE_MARGIN_SECONDS = 0.05
#: A hold shorter than this is not worth a timer: the refusal is answered at once.
SHORTEST_SECONDS = 0.001
#: The wait as the refusals' messages state it (the gateway's penalty box rewrites it alike).
_RETRY_IN = re.compile(r"retry in [0-9.]+s")


class RefusalHold:
    """Holds retryable RESOURCE_EXHAUSTED refusals of this process, at most ``most_held`` at once."""

    def __init__(
        self, max_seconds: float = REFUSAL_HOLD_MAX_MS.default / 1000, most_held: int = REFUSAL_HOLD_MAX_HELD.default
    ) -> None:
        self._max = max_seconds
        self._most = most_held
        self._waiting: set[asyncio.Future[None]] = set()
        self._released = False

    @property
    def held(self) -> int:
        """Refusals held now."""
        return len(self._waiting)

    def release(self) -> None:
        """Answer every held refusal now, and hold none from now on (the process is stopping)."""
        self._released = True
        for waiter in self._waiting:
            if not waiter.done():
                waiter.set_result(None)

    async def hold(self, error: ServiceError, ctx: aio.ServicerContext[Any, Any]) -> ServiceError:
        """``error``, once held as long as it should be, with the wait that remains; at once if not to hold."""
        retry = error.retry_after_seconds
        if retry is None or error.code is not grpc.StatusCode.RESOURCE_EXHAUSTED or self._released or _via_gateway():
            return error
        # A random time between the wait and twice it (between half the cap and the cap for a
        # longer wait): refusals told the same slot (a closed loop's callers, refused together)
        # come back spread out, not all at once.
        seconds = min(retry, self._max / 2) * (1.0 + random.random())  # noqa: S311 - spread, not a secret
        remaining = ctx.time_remaining()
        if remaining is not None:
            seconds = min(seconds, remaining - DEADLINE_MARGIN_SECONDS)
        if seconds < SHORTEST_SECONDS:
            return error
        if len(self._waiting) >= self._most:
            metrics.active().refusal_held(over_cap=True)
            return error
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(seconds, _wake, waiter)
        self._waiting.add(waiter)
        started = loop.time()
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiting.discard(waiter)
        waited = loop.time() - started
        metrics.active().refusal_held(over_cap=False)
        metrics.note_held(waited)
        return _after(error, waited)


def _via_gateway() -> bool:
    """Whether the call came through the gateway (its secret checked), whose penalty box holds
    its tenants' refusals itself: it counts a tenant's slots from the waits it is told as the
    refusals arrive, so a refusal held here as well would reach it late, saying a wait of 1 ms."""
    current = context.current()
    return current is not None and current.via_gateway


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _after(error: ServiceError, waited: float) -> ServiceError:
    """``error`` as sent after ``waited`` seconds: the retry-after (and the message's) what remains."""
    left = max(SHORTEST_SECONDS, (error.retry_after_seconds or 0.0) - waited)
    message = _RETRY_IN.sub(f"retry in {left:.3f}s", error.message, count=1)
    return dataclasses.replace(error, message=message, retry_after_seconds=left)
