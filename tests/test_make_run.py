"""`make run` from a fresh copy of the repository: up, usable with grpcurl, stopped, restarted.

This is the path a new developer takes, so it runs the real Makefile in a copy of the
tracked files: it creates its own .venv, generates code, starts the embedded servers,
migrates, seeds, serves; Ctrl-C stops everything; data survives the restart.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local.grpcurl import PROTOSET
from deploy.local.redis_server import running_pid, start_redis, stop_redis

from .console import Console
from .support import free_port

REPO = Path(__file__).resolve().parents[1]
BANNER = "Towerco AIOps platform is up"

pytestmark = pytest.mark.slow


def _copy_checkout(dest: Path) -> None:
    """The tracked and unignored files as they are in the working tree: a fresh clone."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _make_run(checkout: Path, env: dict[str, str]) -> Console:
    return Console(["make", "run"], checkout, env)


def _make_env(checkout: Path) -> dict[str, str]:
    """The environment of every make call in the clone: the clone's own DATA_DIR, never an inherited one.

    ``make test`` exports DATA_DIR (the developer's ``.data``); a make in the clone that
    inherited it would start or stop the servers of the developer's ``make run``.
    """
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "VIRTUAL_ENV"}}
    env["DATA_DIR"] = str(checkout / ".data")
    return env


def _stop_clone(checkout: Path) -> subprocess.CompletedProcess[str]:
    """``make stop`` in the clone: stops the servers of the clone's data directory only."""
    env = _make_env(checkout)
    return subprocess.run(
        ["make", "stop"], cwd=checkout, env=env, check=False, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    dest = REPO / "test-output" / f"fresh-clone-{os.getpid()}"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    _copy_checkout(dest)
    yield dest
    _stop_clone(dest)
    shutil.rmtree(dest, ignore_errors=True)


def _grpcurl(checkout: Path, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [str(checkout / ".venv" / "bin" / "grpcurl"), "-plaintext"]
    if token:
        command += ["-H", f"authorization: Bearer {token}"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=30, check=False)


def test_make_run_from_fresh_clone_survives_restart(checkout: Path) -> None:
    services = ("TENANT", "SITES", "FEATURES", "AUDIT")
    metrics = tuple(f"{name}_METRICS" for name in services)
    names = ("PG", "REDIS", *services, *metrics, "GATEWAY", "GATEWAY_ADMIN", "PROMETHEUS")
    ports = {name: free_port() for name in names}
    env = _make_env(checkout)
    env.update({f"{name}_PORT": str(port) for name, port in ports.items()})
    sites = f"127.0.0.1:{ports['SITES']}"

    first = _make_run(checkout, env)
    try:
        first.wait_for(BANNER, timeout=900)
        assert (checkout / ".venv" / "bin" / "python").exists()
        # Debian's prometheus is on PATH wherever the suite runs (.ci/run installs it).
        assert f"Prometheus  http://127.0.0.1:{ports['PROMETHEUS']}" in first.text, first.text[-4000:]
        token = subprocess.run(
            ["make", "-s", "token", "TENANT=tenant_a"],
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert token.count(".") == 2, token

        listed = _grpcurl(checkout, sites, "list")
        assert "towerco.sites.v1.SiteService" in listed.stdout, listed.stderr

        seeded = _grpcurl(
            checkout, "-d", '{"site_id": "TWR-A-0001"}', sites, "towerco.sites.v1.SiteService/GetSite", token=token
        )
        assert seeded.returncode == 0, seeded.stderr
        assert json.loads(seeded.stdout)["tenant_id"] == "tenant_a", seeded.stdout

        created = _grpcurl(
            checkout,
            "-d",
            '{"site_id": "RESTART-1", "site": {"name": "Written before the restart"}}',
            sites,
            "towerco.sites.v1.SiteService/CreateSite",
            token=token,
        )
        assert created.returncode == 0, created.stderr

        # The same API through the gateway, the tenant taken from the subdomain.
        edge = f"127.0.0.1:{ports['GATEWAY']}"
        # With the descriptor set make proto built, as the README and the banner give it.
        via_gateway = _grpcurl(
            checkout,
            "-protoset",
            str(checkout / PROTOSET),
            "-authority",
            "tenant_a.localhost",
            "-d",
            '{"page_size": 50}',
            edge,
            "towerco.sites.v1.SiteService/ListSites",
            token=token,
        )
        assert via_gateway.returncode == 0, via_gateway.stderr
        assert {"TWR-A-0001", "RESTART-1"} <= {s["siteId"] for s in json.loads(via_gateway.stdout)["sites"]}
        if shutil.which("npm"):  # the page is built with Node.js where the machine has it
            assert f"http://tenant_a.localhost:{ports['GATEWAY']}/" in first.text

        # As the README's demo does: the next start must come up all the same, tenant_b left suspended.
        admin = subprocess.run(
            ["make", "-s", "token", "ROLE=platform_admin"], cwd=checkout, env=env, capture_output=True, text=True
        ).stdout.strip()
        suspended = _grpcurl(
            checkout,
            "-d",
            '{"tenant_id": "tenant_b", "reason": "unpaid invoice"}',
            f"127.0.0.1:{ports['TENANT']}",
            "towerco.tenant.v1.TenantRegistryService/SuspendTenant",
            token=admin,
        )
        assert suspended.returncode == 0, suspended.stderr
    finally:
        output = first.interrupt()
    assert output.rstrip().endswith("stopped"), output[-4000:]

    stopped = _grpcurl(checkout, sites, "list")
    assert stopped.returncode != 0, "the sites service still answers after Ctrl-C"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", ports["GATEWAY"]), timeout=2).close()

    second = _make_run(checkout, env)
    try:
        second.wait_for(BANNER, timeout=300)
        assert "tenant_b (suspended)" in second.text, second.text[-4000:]
        again = _grpcurl(
            checkout, "-d", '{"site_id": "RESTART-1"}', sites, "towerco.sites.v1.SiteService/GetSite", token=token
        )
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["name"] == "Written before the restart"
    finally:
        output = second.interrupt()
    assert output.rstrip().endswith("stopped"), output[-4000:]


def test_make_stop_in_the_clone_leaves_another_data_dirs_servers_running(
    checkout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``make test`` exports the developer's DATA_DIR; the clone's teardown must not stop that stack."""
    developer = tmp_path / "developer-data"
    start_redis(developer / "redis", free_port())
    start_redis(checkout / ".data" / "redis", free_port())
    monkeypatch.setenv("DATA_DIR", str(developer))  # as `make test` hands it to pytest
    try:
        stopped = _stop_clone(checkout)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert running_pid(developer / "redis") is not None, "make stop in the clone stopped the developer's Redis"
        assert running_pid(checkout / ".data" / "redis") is None, "make stop left the clone's own Redis running"
    finally:
        stop_redis(developer / "redis")
        stop_redis(checkout / ".data" / "redis")
