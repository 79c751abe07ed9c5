"""``python -m gateway``: render the gateway's Envoy configuration, or validate it with Envoy.

``render`` prints this machine's dev configuration (what ``make run`` starts); ``render
--overlay prod`` a cluster's: the services by their headless Service names, the listener on
every interface, and the environment's values (base domain, CORS origins, JWT issuer,
audience and JWKS URL) from the overlay's ``platform.env``, the file its ``towerco-platform``
ConfigMap is generated from, so the gateway and the services read the same values.
``make gateway-config`` writes each overlay's ``gateway-envoy.json`` and, since a cluster's
gateway reads its routes from a file, ``gateway-routes-template.json`` (a test checks they
are current). ``domains`` keeps that routes file in step with the tenants' custom domains
(gateway/domains.py). ``validate`` runs ``envoy --mode validate`` on the dev configuration
and every overlay's, their routes with a custom domain, and fails on any error or
deprecation warning.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from services.runtime.settings import DEFAULT_PORTS, SettingsError

from . import domains
from .config import GatewaySettings, render, render_json, routes_template
from .envoy import EnvoyError, validate

#: Where the kustomize overlays are, each with its ``platform.env``.
OVERLAYS = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes" / "overlays"
#: What every cluster's gateway shares; the environment's own values come from its overlay.
DEPLOY_ENV = {
    "GATEWAY_BIND_HOST": "0.0.0.0",  # noqa: S104 - the pod's listener
    # The demo page is a dev aid; production frontends are their own apps, allowed by CORS.
    "GATEWAY_WEB_DIR": "/nonexistent",
    # An emptyDir the pod's `domains` container writes the routes file into (base/gateway.yaml).
    "GATEWAY_ROUTES_DIR": "/var/run/towerco-gateway/routes",
    # Headless Services: STRICT_DNS sees every ready pod and balances calls over them.
    **{f"{name.upper()}_TARGET": f"{name}:{port}" for name, port in DEFAULT_PORTS.items()},
}
#: What an overlay must set in its platform.env for the gateway.
OVERLAY_VALUES = ("BASE_DOMAIN", "GATEWAY_CORS_ORIGINS", "JWT_ISSUER", "JWT_AUDIENCE", "JWT_JWKS_URL")
#: The custom domain ``validate`` routes, so that a domain's virtual host is checked too.
SAMPLE_DOMAIN = {"aiops.operator.example": "tenant_a"}


def overlays() -> list[str]:
    return sorted(path.parent.name for path in OVERLAYS.glob("*/platform.env"))


def overlay_values(overlay: str) -> dict[str, str]:
    """The overlay's ``platform.env`` (kustomize's env-file format: ``NAME=value``, ``#`` comments)."""
    path = OVERLAYS / overlay / "platform.env"
    if not path.is_file():
        raise SettingsError(f"no overlay {overlay!r}: {path} does not exist (overlays: {', '.join(overlays())})")
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value
    missing = [name for name in OVERLAY_VALUES if not values.get(name)]
    if missing:
        raise SettingsError(f"{path} does not set {', '.join(missing)}")
    return values


def deploy_settings(values: Mapping[str, str]) -> GatewaySettings:
    """A cluster's gateway settings: ``DEPLOY_ENV`` with an overlay's values."""
    return GatewaySettings.from_env({**DEPLOY_ENV, **values})


def _render(args: argparse.Namespace) -> int:
    settings = deploy_settings(overlay_values(args.overlay)) if args.overlay else GatewaySettings.from_env()
    text = render_json(settings)
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.template_out is not None:
        args.template_out.parent.mkdir(parents=True, exist_ok=True)
        args.template_out.write_text(routes_template(settings).to_json())
    return 0


def _validate(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as folder:
        renderings = [("dev", GatewaySettings.from_env())]
        renderings += [(f"overlay {name}", deploy_settings(overlay_values(name))) for name in overlays()]
        for name, settings in renderings:
            stem = Path(folder) / f"envoy-{name.replace(' ', '-')}"
            # Envoy's validate mode reads no routes file: the routes, with a custom domain, inline.
            stem.with_suffix(".json").write_text(json.dumps(render(settings, domains=SAMPLE_DOMAIN)))
            validate(stem.with_suffix(".json"))
            if settings.routes_dir:  # and the bootstrap that reads them from the routes file
                stem.with_suffix(".rds.json").write_text(render_json(settings))
                validate(stem.with_suffix(".rds.json"))
            print(f"gateway: envoy --mode validate: {name} configuration OK")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="render the Envoy configuration")
    render.add_argument("--overlay", help="a cluster's (deploy/kubernetes/overlays/<name>) instead of this machine's")
    render.add_argument("--out", type=Path, help="write here instead of printing")
    render.set_defaults(func=_render)
    render.add_argument("--template-out", type=Path, help="also write the routes template `domains` reads")
    sub.add_parser("validate", help="envoy --mode validate on the dev and every overlay's rendering").set_defaults(
        func=_validate
    )
    sub.add_parser("domains", help="keep the routes file in step with the custom domains (see gateway/domains.py)")
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["domains"]:
        return domains.main(argv[1:])
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
    except (SettingsError, EnvoyError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
