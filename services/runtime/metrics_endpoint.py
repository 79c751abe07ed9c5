"""The HTTP ``/metrics`` a service serves Prometheus on (``<SERVICE>_METRICS_PORT``).

The client library's own server, in a thread: a scrape never waits for the event loop, so
a busy or stuck loop still shows in its numbers. With ``PROMETHEUS_MULTIPROC_DIR`` set it
serves the sum over the worker processes that share the folder (each marks itself dead
on the way out, so the gauges of a gone worker stop counting).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, multiprocess, start_http_server


@dataclass
class MetricsEndpoint:
    """A running ``/metrics``; :meth:`close` stops it."""

    host: str
    port: int
    _server: Any
    _multiproc_dir: str

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._multiproc_dir:
            multiprocess.mark_process_dead(os.getpid(), self._multiproc_dir)  # type: ignore[no-untyped-call]


def start_metrics_endpoint(host: str, port: int, multiproc_dir: str = "") -> MetricsEndpoint:
    """Serve ``/metrics`` on ``host:port`` (the caller checked the port is free)."""
    registry = REGISTRY
    if multiproc_dir:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=multiproc_dir)  # type: ignore[no-untyped-call]
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return MetricsEndpoint(host, port, server, multiproc_dir)
