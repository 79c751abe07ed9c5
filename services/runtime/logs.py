"""One log format for every service, each line tagged with the call's tenant, request id and trace id.

``text`` (the default, for ``make run``) is one readable line per record; ``json`` (pods) one
JSON object per line: ``ts``, ``level``, ``logger``, ``service``, ``message``, ``tenant``,
``request_id``, ``trace_id``, ``span_id``, any ``extra`` the record was given, and
``exception``. A worker of a service run as several (``<SERVICE>_WORKERS``) says which it is:
``sites/1`` in text, ``"worker": 1`` in JSON, since the workers share one output. Whatever
looks like a JWT is replaced before a line is written, whoever logged it: tokens are never
written by the code, and this makes sure of it.

Outages of a dependency are logged once (:class:`Outage`).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any

from . import context, tracing

#: The formats ``LOG_FORMAT`` may name.
FORMATS = ("text", "json")
#: A JSON Web Token: three base64url segments, the first a JSON object's encoding (``{"``).
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
REDACTED = "[redacted token]"
#: What every LogRecord has: anything else on a record is an ``extra`` and goes into JSON lines.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "tenant",
    "request_id",
    "trace_id",
    "span_id",
}


def redact(text: str) -> str:
    """``text`` with every JWT-looking string replaced."""
    return _JWT.sub(REDACTED, text) if "eyJ" in text else text


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = context.current()
        if not hasattr(record, "tenant"):  # the access line names the tenant the call had
            record.tenant = (ctx.tenant_id or "-") if ctx else "-"
        if not hasattr(record, "request_id"):
            record.request_id = ctx.request_id if ctx else "-"
        record.trace_id, record.span_id = tracing.current_ids()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__(
            f"%(asctime)s %(levelname)s {service} %(name)s tenant=%(tenant)s request=%(request_id)s "
            "trace=%(trace_id)s %(message)s"
        )

    _second = -1
    _stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """As logging writes it (``2026-11-30 10:14:18,123``), the seconds formatted once per second."""
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        return "%s,%03d" % (self._stamp, record.msecs)  # noqa: UP031  # logging's default_msec_format


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str, worker: int | None = None) -> None:
        super().__init__()
        self._service = service
        self._worker = {} if worker is None else {"worker": worker}

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "service": self._service,
            "message": record.getMessage(),
            "tenant": getattr(record, "tenant", "-"),
            "request_id": getattr(record, "request_id", "-"),
            "trace_id": getattr(record, "trace_id", "-"),
            "span_id": getattr(record, "span_id", "-"),
            **self._worker,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return redact(json.dumps(line, default=str, ensure_ascii=False))


def configure(service: str, level: str, log_format: str = "text", worker: int | None = None) -> None:
    """Log to stderr in ``log_format`` (one of :data:`FORMATS`) at ``level``; ``worker``: which worker this is."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter(service, worker))
    else:
        handler.setFormatter(TextFormatter(service if worker is None else f"{service}/{worker}"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # No format here writes a record's thread, process or source line: none is looked up for
    # each record (the access line is one per call). logging's documented switches.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None


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
