"""One log format for every service, tagged with the call's tenant and request id; outages logged once."""

from __future__ import annotations

import logging
import sys
import time

from . import context


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = context.current()
        record.tenant = (ctx.tenant_id or "-") if ctx else "-"
        record.request_id = ctx.request_id if ctx else "-"
        return True


def configure(service: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s %(levelname)s {service} %(name)s tenant=%(tenant)s request=%(request_id)s %(message)s"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class Outage:
    """A dependency's outage, logged when it starts and when it ends: never once per failure.

    Callers report every failure with :meth:`failed` and every success with
    :meth:`recovered`. The first failure after a success logs one warning (the error, no
    traceback: the cause is the dependency, not this code); the first success after
    failures logs one line saying how long it lasted and how many failures it absorbed.
    Failures and outages are counted for whoever reports on the process.
    """

    def __init__(self, dependency: str, logger: logging.Logger) -> None:
        self.dependency = dependency
        self._log = logger
        self._since: float | None = None
        self._failures_in_outage = 0
        #: Failures and outages since start-up.
        self.failures = 0
        self.outages = 0

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, error: BaseException) -> None:
        self.failures += 1
        self._failures_in_outage += 1
        if self._since is not None:
            return
        self._since = time.monotonic()
        self.outages += 1
        self._log.warning(
            "%s unavailable (%s: %s); further failures are not logged until it is back",
            self.dependency,
            type(error).__name__,
            error,
        )

    def recovered(self) -> None:
        if self._since is None:
            return
        self._log.info(
            "%s available again after %.1fs (%d failed attempts)",
            self.dependency,
            time.monotonic() - self._since,
            self._failures_in_outage,
        )
        self._since = None
        self._failures_in_outage = 0
