"""A real Prometheus (Debian's ``prometheus`` package) scraping the local stack.

``make run`` starts it when the binary is on PATH, and says so and goes on when it is not.
It runs as a child process like Envoy, on the configuration rendered from
``deploy/prometheus/prometheus.yml`` with the stack's ports, loads the recording and alert
rules of ``deploy/prometheus/rules/``, listens on loopback only and keeps its data in the
folder it is given.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from string import Template
from typing import IO, Any

from services.runtime.environment import integer

from .procs import LocalServerError, log_tail

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
CONFIG_TEMPLATE = PROMETHEUS_DIR / "prometheus.yml"
RULES_DIR = PROMETHEUS_DIR / "rules"
#: The jobs the template scrapes, one per service (the gateway's is added apart).
SERVICE_JOBS = ("tenant", "sites", "features", "audit")

PROMETHEUS_PORT = integer(
    "PROMETHEUS_PORT", 9090, "where `make run`'s Prometheus listens (127.0.0.1), when `prometheus` is on PATH"
)


class PrometheusError(LocalServerError):
    """Prometheus could not be started."""


def prometheus_binary() -> str | None:
    """The ``prometheus`` executable on PATH (Debian's package), or None."""
    return shutil.which("prometheus")


def render_config(metrics_ports: Mapping[str, int], gateway_admin_port: int, scrape_interval: str = "5s") -> str:
    """The template filled in for a stack on this machine: what each job scrapes, how often."""
    missing = set(SERVICE_JOBS) - set(metrics_ports)
    if missing:
        raise ValueError(f"no metrics port for {', '.join(sorted(missing))}")
    fields = {f"{name}_metrics": f"127.0.0.1:{metrics_ports[name]}" for name in SERVICE_JOBS}
    return Template(CONFIG_TEMPLATE.read_text()).substitute(
        fields,
        gateway_admin=f"127.0.0.1:{gateway_admin_port}",
        scrape_interval=scrape_interval,
        rules_dir=str(RULES_DIR),
    )


def start_prometheus(config: Path, data_dir: Path, port: int, log: IO[bytes] | None = None) -> subprocess.Popen[bytes]:
    """Prometheus on ``config`` on ``127.0.0.1:port``, its database in ``data_dir``, its output to ``log``."""
    binary = prometheus_binary()
    if binary is None:
        raise PrometheusError("prometheus is not on PATH (Debian: apt-get install prometheus)")
    data_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(  # noqa: S603 - the packaged binary, arguments built here
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={data_dir}",
            f"--web.listen-address=127.0.0.1:{port}",
            # The 30-day SLIs and error budget need 30 days of samples.
            "--storage.tsdb.retention.time=31d",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
        stdin=subprocess.DEVNULL,
    )


def wait_ready(process: subprocess.Popen[bytes], port: int, log: Path | None = None, timeout: float = 30.0) -> None:
    """Until ``/-/ready`` answers (the database is open and the rules are loaded); the
    error says why it did not, from the end of its ``log`` (a port in use, a bad rule)."""
    deadline = time.monotonic() + timeout
    problem = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            said = f"\n--- tail of {log} ---\n{log_tail(log, 10)}" if log else ""
            raise PrometheusError(f"prometheus exited with code {process.returncode} while starting{said}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1) as reply:
                if reply.status == 200:
                    return
        except (OSError, urllib.error.URLError) as exc:
            problem = str(exc)
        time.sleep(0.1)
    raise PrometheusError(f"prometheus was not ready on 127.0.0.1:{port} within {timeout:.0f}s: {problem}")


def query(url: str, promql: str, timeout: float = 5.0) -> Any:
    """The ``result`` of an instant query to the Prometheus at ``url`` (a vector: a list of
    ``{"metric": ..., "value": [time, "text"]}``); PrometheusError with its reason if it fails."""
    request = f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310 - loopback
            body = json.loads(reply.read())
    except urllib.error.HTTPError as exc:  # 400/422: the query's fault, said in the body
        body = json.loads(exc.read() or b"{}")
    if body.get("status") != "success":
        raise PrometheusError(f"query {promql!r} failed: {body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]
