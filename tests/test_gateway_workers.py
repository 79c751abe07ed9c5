"""The gateway's Envoy runs the configured worker threads and spreads connections over them.

A worker serves every call of the connections it holds, so a gateway whose connections all
sit on one worker serves on one core however many it has. The listener's ``exact_balance``
hands each new connection to the worker holding the fewest: with connections held open at
once, every worker gets some. Read from the real Envoy's admin interface: its command line
(``/server_info``) and each worker's count of the listener's connections (``/stats``).
"""

from __future__ import annotations

import http.client
import json
import re
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from deploy.local.stack import Stack, machine_cores
from gateway.config import HEALTH_PATH, GatewaySettings

from .support import free_port

pytestmark = pytest.mark.stack

WORKERS = 2
#: Connections held open at once: several per worker. The kernel's hash alone splits 16 over 2
#: workers evenly (8 and 8) in one case of five.
CONNECTIONS = 16
_WORKER_CONNECTIONS = re.compile(r"^listener\.[^:]+\.worker_(\d+)\.downstream_cx_total: (\d+)$")


def admin(settings: GatewaySettings, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{settings.admin_port}{path}", timeout=5) as reply:
        body: bytes = reply.read()
        return body


def concurrency(settings: GatewaySettings) -> int:
    """The ``--concurrency`` the running Envoy was started with."""
    return int(json.loads(admin(settings, "/server_info"))["command_line_options"]["concurrency"])


def connections_by_worker(settings: GatewaySettings) -> dict[int, int]:
    """Each worker's count of connections its listener accepted (``worker_<n>.downstream_cx_total``)."""
    text = admin(settings, "/stats?filter=" + r"^listener\..*\.worker_[0-9]+\.downstream_cx_total$").decode()
    return {int(m[1]): int(m[2]) for line in text.splitlines() if (m := _WORKER_CONNECTIONS.match(line))}


@pytest.fixture
def two_worker_gateway(stack: Stack) -> Iterator[GatewaySettings]:
    env = {"GATEWAY_PORT": str(free_port()), "GATEWAY_ADMIN_PORT": str(free_port()), "GATEWAY_WEB_DIR": "/none"}
    settings = stack.start_gateway(extra_env=env, instance="gateway-workers", workers=WORKERS)
    try:
        yield settings
    finally:
        stack.stop("gateway-workers")


def test_the_test_stacks_gateway_runs_a_worker_per_core_as_make_run_does(stack, gateway):
    assert stack.config.gateway_workers == machine_cores()
    assert concurrency(gateway) == machine_cores()


def test_connections_held_at_once_are_spread_over_every_worker(two_worker_gateway):
    settings = two_worker_gateway
    assert concurrency(settings) == WORKERS
    assert connections_by_worker(settings) == dict.fromkeys(range(WORKERS), 0)
    with ExitStack() as held:
        for _ in range(CONNECTIONS):
            connection = http.client.HTTPConnection("127.0.0.1", settings.port, timeout=5)
            held.callback(connection.close)
            # A whole request and its answer: the connection is past the listener's filters and counted.
            connection.request("GET", HEALTH_PATH)
            reply = connection.getresponse()
            reply.read()
            assert reply.status == 200
        by_worker = connections_by_worker(settings)
    assert sum(by_worker.values()) == CONNECTIONS, by_worker
    assert all(count >= 1 for count in by_worker.values()), by_worker
    # exact_balance: each new connection went to the worker holding the fewest, none closed
    # meanwhile, so the counts differ by one at most (not by chance: the kernel's hash rarely).
    assert max(by_worker.values()) - min(by_worker.values()) <= 1, by_worker
