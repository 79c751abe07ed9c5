"""A service that cannot start says why in one line and exits with code 2, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from deploy.local.tokens import ensure_keys

from .support import free_port

REPO = Path(__file__).resolve().parents[1]


def start_sites(tmp_path: Path, port: int, metrics_port: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m services.sites`` on ``port`` until it exits (no database: it must stop before one)."""
    ensure_keys(tmp_path / "keys")
    env = {
        **os.environ,
        "DATA_DIR": str(tmp_path),
        # Never reached: the port is checked before migrations and connections.
        "SITES_DATABASE_URL": "postgresql://sites_app@127.0.0.1:1/none",
        "SITES_PORT": str(port),
        "SITES_METRICS_PORT": str(metrics_port or free_port()),
        "GRPC_BIND_HOST": "127.0.0.1",
        "PYTHONUNBUFFERED": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "services.sites"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_port_in_use_is_refused_in_one_line_naming_it(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = start_sites(tmp_path, port)

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "sites refused to start" in lines[0]
    assert f"port {port} on 127.0.0.1 is already in use" in lines[0]
    assert "SITES_PORT" in lines[0]
    assert result.stdout == ""


def test_a_metrics_port_in_use_is_refused_in_one_line_naming_it(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        metrics_port = holder.getsockname()[1]
        result = start_sites(tmp_path, free_port(), metrics_port)

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"port {metrics_port} on 127.0.0.1 is already in use" in lines[0]
    assert "SITES_METRICS_PORT" in lines[0]
