"""One log format for every service, tagged with the call's tenant and request id."""

from __future__ import annotations

import logging
import sys

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
