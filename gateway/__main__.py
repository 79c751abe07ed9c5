"""``python -m gateway render [--deploy] [--out FILE]``: print or write the Envoy configuration.

Without ``--deploy`` the dev settings of this machine (``make run``) are rendered. With it,
the cluster's: services by their Service names, the listener on every interface, and the
identity provider's JWKS from ``JWT_JWKS_URL`` (default: a placeholder to replace).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from services.runtime.settings import DEFAULT_PORTS, SettingsError

from .config import GatewaySettings, render_json

DEPLOY_ENV = {
    "GATEWAY_BIND_HOST": "0.0.0.0",  # noqa: S104 - the pod's listener
    "BASE_DOMAIN": "aiops.towerco.example",
    "GATEWAY_CORS_ORIGINS": "https://*.aiops.towerco.example",
    "JWT_JWKS_URL": "https://login.towerco.example/.well-known/jwks.json",
    # The demo page is a dev aid; production frontends are their own apps, allowed by CORS.
    "GATEWAY_WEB_DIR": "/nonexistent",
    **{f"{name.upper()}_TARGET": f"{name}:{port}" for name, port in DEFAULT_PORTS.items()},
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="render the Envoy configuration")
    render.add_argument("--deploy", action="store_true", help="the cluster's settings instead of this machine's")
    render.add_argument("--out", type=Path, help="write here instead of printing")
    args = parser.parse_args(argv)
    try:
        settings = GatewaySettings.from_env(DEPLOY_ENV if args.deploy else None)
        text = render_json(settings)
    except SettingsError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
