"""``python -m deploy.kubernetes.render``: the kustomize overlays as CI checks them.

Each overlay's Secrets are generated from files under ``overlays/<env>/secrets/``, which
git ignores: the real values never enter the repository. To render an overlay all the
same (``make lint``, tests/test_kubernetes_overlays.py), this copies the manifests to a
temporary folder, puts the placeholders of ``secrets.example/`` where the secrets go and
runs ``kubectl kustomize`` there; ``make lint`` then checks every object against the
Kubernetes API schema of :data:`KUBERNETES_VERSION` with ``kubernetes-validate --strict``.
An operator renders the real thing with ``kubectl kustomize deploy/kubernetes/overlays/prod``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

KUBERNETES = Path(__file__).resolve().parent
OVERLAYS = ("dev", "prod")
SECRETS_EXAMPLE = KUBERNETES / "secrets.example"
#: The cluster version the manifests are written for (Debian's kubectl is 1.32).
KUBERNETES_VERSION = "1.32.0"


class RenderError(Exception):
    """kubectl is missing or kustomize refused the overlay; the message says which."""


def render(overlay: str) -> str:
    """``kubectl kustomize overlays/<overlay>`` with the placeholder secrets, as YAML."""
    if overlay not in OVERLAYS:
        raise RenderError(f"no overlay {overlay!r}: one of {', '.join(OVERLAYS)}")
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise RenderError("kubectl not found: install it (Debian: apt-get install kubectl) to render the overlays")
    with tempfile.TemporaryDirectory(prefix="towerco-kustomize-") as folder:
        copy = Path(folder) / "kubernetes"
        shutil.copytree(KUBERNETES, copy, ignore=shutil.ignore_patterns("secrets", "*.py", "__pycache__"))
        shutil.copytree(SECRETS_EXAMPLE, copy / "overlays" / overlay / "secrets")
        done = subprocess.run(  # noqa: S603 - kubectl from PATH, fixed arguments
            [kubectl, "kustomize", str(copy / "overlays" / overlay)], capture_output=True, text=True, check=False
        )
    if done.returncode != 0:
        raise RenderError(f"kubectl kustomize overlays/{overlay}: {done.stderr.strip()}")
    return done.stdout


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.kubernetes.render", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="write <overlay>.yaml for each overlay here")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        for overlay in OVERLAYS:
            (args.out / f"{overlay}.yaml").write_text(render(overlay))
            print(f"kubernetes: rendered overlays/{overlay} to {args.out / overlay}.yaml")
    except RenderError as exc:
        print(f"kubernetes: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
