"""``make run`` keeps its stack up: a crashed service, PostgreSQL, Redis or Envoy is restarted.

The rules (backoff, giving up) are checked on their own in milliseconds; then a real dev
stack (``python -m deploy.local run``, as ``make run`` starts it, with its own data
directory and ports) has a service, Redis, PostgreSQL and Envoy killed under it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc

from deploy.local import postgres, redis_server
from deploy.local.prometheus import PrometheusError, query
from deploy.local.supervisor import RestartPolicy, Supervised, Supervisor
from deploy.local.tokens import mint

from .console import Console
from .support import bearer, free_port

REPO = Path(__file__).resolve().parents[1]
BANNER = "Towerco AIOps platform is up"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Flaky:
    """A process record whose deaths and restarts the test decides."""

    def __init__(self, fail_restarts: int = 0) -> None:
        self.running = True
        self.restarts = 0
        self.fail_restarts = fail_restarts

    def check(self) -> str | None:
        return None if self.running else "exited with code -9"

    def restart(self) -> str:
        if self.fail_restarts:
            self.fail_restarts -= 1
            raise OSError("port taken")
        self.restarts += 1
        self.running = True
        return f"pid {100 + self.restarts}"


class Harness:
    """A supervisor of one flaky ``sites`` on a clock the test moves, and what it said."""

    def __init__(self, fail_restarts: int = 0) -> None:
        self.clock = FakeClock()
        self.flaky = Flaky(fail_restarts)
        self.said: list[str] = []
        sites = Supervised("sites", self.flaky.check, self.flaky.restart)
        self.supervisor = Supervisor([sites], RestartPolicy(), report=self.said.append, clock=self.clock)


def test_a_crashed_process_is_restarted_after_a_delay_that_doubles_with_each_crash() -> None:
    h = Harness()
    delays = []
    for _ in range(3):
        h.flaky.running = False
        assert h.supervisor.tick() is None
        restart_at = h.supervisor.processes[0].restart_at
        assert restart_at is not None
        delays.append(restart_at - h.clock.now)
        h.clock.now = restart_at - 0.01
        h.supervisor.tick()
        assert not h.flaky.running, "restarted before its delay was over"
        h.clock.now = restart_at
        h.supervisor.tick()
        assert h.flaky.running
    assert delays == [0.5, 1.0, 2.0]
    assert h.said[0] == "sites exited with code -9; restarting it in 0.5s (crash 1 within 60s)"
    assert h.said[1] == "sites restarted (pid 101)"


def test_five_crashes_within_a_minute_stop_the_stack_with_the_reason() -> None:
    h = Harness()
    reasons = []
    for _ in range(5):
        h.flaky.running = False
        reasons.append(h.supervisor.tick())
        h.clock.now += 10.0  # past every delay, within the minute
        h.supervisor.tick()
    assert reasons == [None] * 4 + ["sites exited with code -9: 5 crashes within 60s, giving up"]
    assert h.flaky.restarts == 4


def test_crashes_older_than_the_window_are_forgotten() -> None:
    h = Harness()
    for _ in range(10):
        h.flaky.running = False
        assert h.supervisor.tick() is None
        h.clock.now += 30.0  # two crashes a minute: never five within one
        h.supervisor.tick()
    assert h.flaky.restarts == 10


def test_a_failed_restart_counts_as_a_crash_and_is_tried_again() -> None:
    h = Harness(fail_restarts=1)
    h.flaky.running = False
    h.supervisor.tick()
    h.clock.now += 0.5
    assert h.supervisor.tick() is None
    assert h.said[-1] == "sites could not be restarted: port taken; restarting it in 1s (crash 2 within 60s)"
    h.clock.now += 1.0
    h.supervisor.tick()
    assert h.flaky.running
    assert h.said[-1] == "sites restarted (pid 101)"


def test_a_service_is_restarted_only_once_the_server_it_needs_is_back() -> None:
    clock, said = FakeClock(), list[str]()
    server, service = Flaky(fail_restarts=1), Flaky()
    supervisor = Supervisor(
        [
            Supervised("PostgreSQL", server.check, server.restart),
            Supervised("sites", service.check, service.restart, needs=("PostgreSQL",)),
        ],
        report=said.append,
        clock=clock,
    )
    server.running = service.running = False
    supervisor.tick()
    clock.now += 0.5
    supervisor.tick()  # the server's restart fails; the service's is due but waits for it
    assert not service.running and service.restarts == 0
    clock.now += 1.0
    supervisor.tick()
    assert server.running and service.running
    assert said[-2:] == ["PostgreSQL restarted (pid 101)", "sites restarted (pid 101)"]


def test_nothing_is_restarted_once_ctrl_c_is_pressed() -> None:
    """Ctrl-C reaches the services too: their exit then is no crash."""
    h = Harness()
    h.flaky.running = False
    assert h.supervisor.watch(lambda: True) is None
    assert h.supervisor.tick(lambda: True) is None
    assert h.said == []
    assert h.flaky.restarts == 0


class DevStack:
    def __init__(self, data_dir: Path, ports: dict[str, int], extra_env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.ports = ports
        env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
        env.update({f"{name}_PORT": str(port) for name, port in ports.items()}, DATA_DIR=str(data_dir))
        env.update(extra_env or {})
        self.console = Console([sys.executable, "-m", "deploy.local", "run"], REPO, env)

    def child(self, argv_part: str) -> int:
        """Pid of the stack's child process whose command line has ``argv_part``."""
        pid = self.console.process.pid
        children = " ".join(Path(task, "children").read_text() for task in Path(f"/proc/{pid}/task").iterdir())
        for child in map(int, children.split()):
            if argv_part in Path(f"/proc/{child}/cmdline").read_text().replace("\0", " "):
                return child
        raise AssertionError(f"no child of the dev stack runs {argv_part!r}")


@contextmanager
def _dev_stack(extra_env: dict[str, str] | None = None) -> Iterator[DevStack]:
    services = ("TENANT", "SITES", "FEATURES", "AUDIT")
    metrics = tuple(f"{name}_METRICS" for name in services)
    names = ("PG", "REDIS", *services, *metrics, "GATEWAY", "GATEWAY_ADMIN", "PROMETHEUS")
    # Under test-output/ like the session's data, not tmp_path: a concurrent pytest makes its
    # base temp directory private again, and PostgreSQL runs as another user when we are root.
    data_dir = REPO / "test-output" / f"dev-stack-{uuid.uuid4().hex[:8]}"
    stack = DevStack(data_dir, {name: free_port() for name in names}, extra_env)
    try:
        yield stack
    finally:
        if stack.console.process.poll() is None:
            stack.console.interrupt()
        # Whatever a failed run left behind (the servers are daemons), never another stack's.
        redis_server.stop_redis(data_dir / "redis")
        postgres.stop_postgres(data_dir / "pg")
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def dev_stack() -> Iterator[DevStack]:
    with _dev_stack() as stack:
        yield stack


@pytest.fixture
def dev_stack_without_prometheus() -> Iterator[DevStack]:
    """A dev stack on a machine without Debian's prometheus: a PATH that has no such binary
    (the stack finds its other programs by absolute path; useradd is in /usr/sbin)."""
    assert shutil.which("prometheus", path="/usr/sbin") is None
    with _dev_stack({"PATH": "/usr/sbin"}) as stack:
        yield stack


def _eventually(check: Callable[[], object], within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            check()
            return
        except (grpc.RpcError, AssertionError, OSError, PrometheusError):
            if time.monotonic() >= deadline:
                raise
        time.sleep(0.2)


def test_dev_stack_restarts_a_killed_service_redis_postgres_envoy_and_prometheus_and_stops_on_ctrl_c(
    dev_stack: DevStack,
) -> None:
    console = dev_stack.console
    console.wait_for(BANNER, timeout=180)
    assert f"Prometheus  http://127.0.0.1:{dev_stack.ports['PROMETHEUS']}" in console.text, console.text[-4000:]
    token = bearer(mint(dev_stack.data_dir / "keys", tenant="tenant_a", role="admin", ttl=600))
    direct = grpc.insecure_channel(f"127.0.0.1:{dev_stack.ports['SITES']}")
    edge = grpc.insecure_channel(
        f"127.0.0.1:{dev_stack.ports['GATEWAY']}", options=[("grpc.default_authority", "tenant_a.localhost")]
    )
    with direct, edge:
        sites, via_gateway = sites_grpc.SiteServiceStub(direct), sites_grpc.SiteServiceStub(edge)
        assert sites.GetSite(sites_pb.GetSiteRequest(site_id="TWR-A-0001"), metadata=token, timeout=10).name

        killed = {
            "sites": dev_stack.child("-m services.sites"),
            "gateway": dev_stack.child("envoy"),
            "Prometheus": dev_stack.child("prometheus --config.file"),
            "Redis": redis_server.running_pid(dev_stack.data_dir / "redis"),
            "PostgreSQL": postgres.running_pid(dev_stack.data_dir / "pg"),
        }
        since = console.mark()
        for pid in killed.values():
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
        for name in killed:
            console.wait_for(f"make run: {name} restarted", timeout=60, since=since)
        output = console.text[since:]
        assert "sites exited with code -9; restarting it in 0.5s" in output, output
        assert "gateway exited with code -9; restarting it in 0.5s" in output, output
        assert "Prometheus exited with code -9; restarting it in 0.5s" in output, output
        assert "Redis is not running; restarting it" in output, output
        assert "PostgreSQL is not running; restarting it" in output, output
        assert dev_stack.child("-m services.sites") != killed["sites"]

        # Reads and writes work again, straight to the service and through the gateway.
        def write_and_read() -> None:
            sites.CreateSite(
                sites_pb.CreateSiteRequest(site_id="AFTER-KILL", request_id="after-kill", site=sites_pb.Site(name="x")),
                metadata=token,
                timeout=10,
            )
            listed = via_gateway.ListSites(sites_pb.ListSitesRequest(page_size=50), metadata=token, timeout=10)
            assert "AFTER-KILL" in {site.site_id for site in listed.sites}

        _eventually(write_and_read, within=30)

        # The restarted Prometheus scrapes every service's /metrics and the restarted gateway.
        def all_scraped() -> None:
            up = query(f"http://127.0.0.1:{dev_stack.ports['PROMETHEUS']}", "up")
            assert {sample["metric"]["job"]: sample["value"][1] for sample in up} == {
                job: "1" for job in ("tenant", "sites", "features", "audit", "gateway")
            }, up

        _eventually(all_scraped, within=30)
        assert console.process.poll() is None, "the dev stack stopped after its processes were killed"

    since = console.mark()
    output = console.interrupt()
    assert output.rstrip().endswith("stopped"), output[-4000:]
    assert "restart" not in output[since:], "Ctrl-C was taken for crashes: " + output[since:]
    assert console.process.returncode == 0
    assert redis_server.running_pid(dev_stack.data_dir / "redis") is None
    assert postgres.running_pid(dev_stack.data_dir / "pg") is None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", dev_stack.ports["SITES"]), timeout=2).close()


def test_dev_stack_gives_up_on_a_service_that_keeps_crashing_and_says_why(dev_stack: DevStack) -> None:
    console = dev_stack.console
    console.wait_for(BANNER, timeout=180)
    since = console.mark()
    os.kill(dev_stack.child("-m services.sites"), signal.SIGKILL)
    # Another program takes the port as soon as the dead one lets it go (its restart comes
    # half a second later at the earliest): every restart of sites now exits at once.
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 2
        while True:
            try:
                squatter.bind(("127.0.0.1", dev_stack.ports["SITES"]))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        squatter.listen()
        assert console.process.wait(timeout=60) == 1
    output = console.interrupt()[since:]  # collects the rest of the output; the stack has stopped itself
    assert output.count("make run: sites restarted") == 4, output
    assert "make run: sites exited with code 2: 5 crashes within 60s, giving up; stopping" in output, output
    assert output.rstrip().endswith("stopped"), output
    assert redis_server.running_pid(dev_stack.data_dir / "redis") is None
    assert postgres.running_pid(dev_stack.data_dir / "pg") is None


def test_dev_stack_without_prometheus_says_so_and_serves_all_the_same(dev_stack_without_prometheus: DevStack) -> None:
    stack = dev_stack_without_prometheus
    stack.console.wait_for(BANNER, timeout=180)
    assert "Prometheus  not started: no prometheus on PATH" in stack.console.text, stack.console.text[-4000:]
    token = bearer(mint(stack.data_dir / "keys", tenant="tenant_a", role="admin", ttl=600))
    with grpc.insecure_channel(f"127.0.0.1:{stack.ports['SITES']}") as channel:
        site = sites_grpc.SiteServiceStub(channel).GetSite(
            sites_pb.GetSiteRequest(site_id="TWR-A-0001"), metadata=token, timeout=10
        )
        assert site.name
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", stack.ports["PROMETHEUS"]), timeout=2).close()
    assert stack.console.process.poll() is None
