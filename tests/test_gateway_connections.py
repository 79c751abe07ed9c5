"""One client cannot lock others out of the gateway by holding connections open.

A gateway of the test's own with a small connection cap (the session gateway keeps the
default) is filled past its cap by one client's idle connections, half of them silent and
half that open HTTP/2 like a gRPC client and then send nothing. Meanwhile a well-behaved
gRPC client still gets its answer, and the gateway closes every one of the idle ones.
Everything is on loopback, bounded in count and time, and closed at the end.
"""

from __future__ import annotations

import contextlib
import resource
import select
import socket
import time
from collections.abc import Iterator

import grpc
import pytest
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb
from towerco.tenant.v1 import tenant_registry_service_pb2_grpc as tenant_grpc

from deploy.local.stack import Stack
from gateway.config import GatewaySettings

from .support import free_port

pytestmark = pytest.mark.stack

#: The cap of the test's gateway, and the idle connections one client opens against it.
CAP = 600
FLOOD = 1500
#: What a gRPC client sends first: the HTTP/2 preface and an empty SETTINGS frame.
HTTP2_OPENING = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


@pytest.fixture
def small_gateway(stack: Stack) -> Iterator[GatewaySettings]:
    _allow_open_files(FLOOD + 1000)  # the flood's sockets here, and Envoy's (it inherits the limit)
    env = {
        "GATEWAY_PORT": str(free_port()),
        "GATEWAY_ADMIN_PORT": str(free_port()),
        "GATEWAY_WEB_DIR": "/none",
        "GATEWAY_MAX_CONNECTIONS": str(CAP),
        "GATEWAY_FIRST_BYTES_TIMEOUT_SECONDS": "1",
        "GATEWAY_IDLE_TIMEOUT_SECONDS": "2",
    }
    settings = stack.start_gateway(extra_env=env, instance="gateway-small")
    try:
        yield settings
    finally:
        stack.stop("gateway-small")


def _allow_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


@contextlib.contextmanager
def idle_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections from one client that never make a call; all closed on exit."""
    opened: list[socket.socket] = []
    try:
        for n in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(("127.0.0.1", port))
            if n % 2:
                sock.sendall(HTTP2_OPENING)
            opened.append(sock)
        yield opened
    finally:
        for sock in opened:
            sock.close()


def closed_by_peer(sockets: list[socket.socket], within: float) -> int:
    """How many of ``sockets`` the gateway closed (EOF or reset) within ``within`` seconds."""
    open_ = {sock.fileno(): sock for sock in sockets}
    closed = 0
    deadline = time.monotonic() + within
    poller = select.poll()
    for fd in open_:
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while open_ and time.monotonic() < deadline:
        for fd, _ in poller.poll(200):
            sock = open_[fd]
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:  # EOF or reset: the gateway let it go
                poller.unregister(fd)
                del open_[fd]
                closed += 1
    return closed


def test_a_well_behaved_client_is_answered_while_another_holds_idle_connections_past_the_cap(
    small_gateway, tenant_pair
):
    tenant, _ = tenant_pair
    with idle_connections(small_gateway.port, FLOOD) as flood:
        # The gateway is full: the flood holds CAP connections, the rest were refused.
        options = [
            ("grpc.default_authority", "localhost"),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        with grpc.insecure_channel(f"127.0.0.1:{small_gateway.port}", options=options) as channel:
            stub = tenant_grpc.TenantRegistryServiceStub(channel)
            # wait_for_ready: the client keeps reconnecting as gRPC clients do, within 30 s.
            branding = stub.GetBranding(tenant_pb.GetBrandingRequest(tenant_id=tenant), timeout=30, wait_for_ready=True)
            assert branding.display_name
        # Every idle connection is closed by the gateway, silent or HTTP/2 alike.
        assert closed_by_peer(flood, within=30) == FLOOD
