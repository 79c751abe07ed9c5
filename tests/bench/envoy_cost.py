"""What Envoy costs a call, and how much of it is our configuration: Envoy's CPU per sequential
GetSite and its p50 over direct, for three Envoys side by side on one bench stack.

- ``minimal``: written by hand, a static listener, an HCM with the router alone (no access log,
  no tracing, Envoy's defaults) and one HTTP/2 cluster to the sites service;
- ``floor``: the gateway's rendering with only grpc_web and the router, no access log, no
  local replies, no early header mutations;
- ``gateway``: the gateway as ``python -m gateway render`` gives it (routes inline).

Each runs as the dev stack runs Envoy (``deploy.local.gateway.start_envoy``: the stack's
``gateway_workers``, the same command line); sequential calls on one connection meet one
worker. CPU is the on-CPU time of all the Envoy process's threads
(``/proc/<pid>/task/*/schedstat``, first field) over a round of calls; "runs" is how often its
threads were scheduled in (third field). Rounds alternate between the Envoys and the service
called directly, so that each sees the same minutes of a shared machine.
``python -m tests.bench.envoy_cost [--rounds 8] [--calls 300]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from deploy.local.gateway import start_envoy, wait_ready
from deploy.local.stack import stop_process
from gateway.config import GatewaySettings, render
from services.runtime.settings import gateway_secret
from tests.support import free_port

from .bench_stack import BenchStack, bench_stack
from .latency import GET, site_stub, tenant_host
from .timing import ms, percentile, sequential

#: The filters the floor keeps.
FLOOR_FILTERS = ("envoy.filters.http.grpc_web", "envoy.filters.http.router")
_TYPES = "type.googleapis.com/envoy.extensions"


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def minimal(settings: GatewaySettings, sites: str) -> dict[str, Any]:
    """The least Envoy that proxies a gRPC call to ``sites`` (host:port)."""
    host, _, port = sites.rpartition(":")
    manager = {
        "@type": f"{_TYPES}.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "minimal",
        "codec_type": "AUTO",
        "route_config": {
            "virtual_hosts": [
                {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "sites"}}]}
            ]
        },
        "http_filters": [
            {"name": "envoy.filters.http.router", "typed_config": {"@type": f"{_TYPES}.filters.http.router.v3.Router"}}
        ],
    }
    protocol = {
        "@type": f"{_TYPES}.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
    return {
        "admin": {"address": _address("127.0.0.1", settings.admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "minimal",
                    "address": _address("127.0.0.1", settings.port),
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "sites",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": protocol
                    },
                    "load_assignment": {
                        "cluster_name": "sites",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(host, int(port))}}]}],
                    },
                }
            ],
        },
    }


def floor(settings: GatewaySettings, sites: str) -> dict[str, Any]:
    document = render(settings)
    manager = document["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    manager["http_filters"] = [f for f in manager["http_filters"] if f["name"] in FLOOR_FILTERS]
    for key in ("access_log", "local_reply_config", "early_header_mutation_extensions"):
        manager.pop(key, None)
    return document


def gateway(settings: GatewaySettings, sites: str) -> dict[str, Any]:
    return render(settings)


VARIANTS: dict[str, Callable[[GatewaySettings, str], dict[str, Any]]] = {
    "minimal": minimal,
    "floor": floor,
    "gateway": gateway,
}


def scheduled(pid: int) -> tuple[int, int]:
    """Nanoseconds on CPU and times scheduled in, summed over the process's threads."""
    cpu = runs = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()
        except OSError:  # a thread that ended meanwhile
            continue
        cpu, runs = cpu + int(fields[0]), runs + int(fields[2])
    return cpu, runs


@dataclass
class Taken:
    cpu_us: list[float] = field(default_factory=list)
    runs: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


@contextmanager
def envoy(bench: BenchStack, name: str) -> Iterator[tuple[int, int]]:
    """The variant ``name`` running on free ports: its pid and port."""
    stack = bench.stack
    extra = {"GATEWAY_WEB_DIR": "/none", "GATEWAY_PORT": str(free_port()), "GATEWAY_ADMIN_PORT": str(free_port())}
    settings = stack.gateway_settings(extra)
    config = stack.config.data_dir / f"envoy-cost-{name}.json"
    config.write_text(json.dumps(VARIANTS[name](settings, bench.sites)))
    env = stack.service_env(extra)
    env["GATEWAY_SECRET"] = gateway_secret(stack.keys_dir, env).decode()
    process = start_envoy(config, bench.log(f"envoy-cost-{name}"), stack.config.gateway_workers, env=env)
    try:
        wait_ready(process, settings)
        yield process.pid, settings.port
    finally:
        stop_process(process, 10)


def measure(rounds: int, calls: int) -> tuple[list[float], dict[str, Taken]]:
    taken = {name: Taken() for name in VARIANTS}
    direct: list[float] = []
    with bench_stack() as bench, ExitStack() as stack:
        md = bench.metadata("bench_tenant")
        host = tenant_host("bench_tenant")
        envoys = {name: stack.enter_context(envoy(bench, name)) for name in VARIANTS}
        stubs = {name: stack.enter_context(site_stub(f"127.0.0.1:{port}", host)) for name, (_, port) in envoys.items()}
        service = stack.enter_context(site_stub(bench.sites))
        for stub in [service, *stubs.values()]:
            for _ in range(100):
                stub.GetSite(GET, metadata=md)
        for index in range(rounds):
            direct += sequential(partial(service.GetSite, GET, metadata=md))(calls)
            order = list(VARIANTS) if index % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                pid, stub = envoys[name][0], stubs[name]
                before = scheduled(pid)
                taken[name].seconds += sequential(partial(stub.GetSite, GET, metadata=md))(calls)
                after = scheduled(pid)
                taken[name].cpu_us.append((after[0] - before[0]) / calls / 1000)
                taken[name].runs.append((after[1] - before[1]) / calls)
    return direct, taken


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.envoy_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--calls", type=int, default=300, help="sequential GetSite calls per round and Envoy")
    args = parser.parse_args(argv)
    direct, taken = measure(args.rounds, args.calls)
    direct_p50 = ms(percentile(direct, 0.5))
    load = os.getloadavg()
    print(f"direct p50 {direct_p50:.3f} ms; {args.rounds} rounds of {args.calls}; load {load[0]:.1f} {load[1]:.1f}")
    for name, row in taken.items():
        p50 = ms(percentile(row.seconds, 0.5))
        print(
            f"{name:<8} Envoy CPU {statistics.median(row.cpu_us):6.1f} us/call"
            f" (rounds {' '.join(f'{x:.0f}' for x in row.cpu_us)}),"
            f" {statistics.median(row.runs):.2f} runs/call, p50 {p50:.3f} ms (+{p50 - direct_p50:.3f} over direct)"
        )


if __name__ == "__main__":
    main()
