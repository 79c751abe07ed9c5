"""``make certs``: a self-signed CA and a server pair it signs, for trying TLS on one machine.

Written under ``$DATA_DIR/tls/`` with the names a Kubernetes TLS Secret uses: ``ca.crt``
(what clients trust: grpcurl ``-cacert``, ``GRPC_TLS_CA_FILE``,
``GATEWAY_UPSTREAM_TLS_CA_FILE``), ``tls.crt`` and ``tls.key`` (the server's pair, for
``GATEWAY_TLS_*`` and ``GRPC_TLS_*``), and ``ca.key``. The server certificate names
``localhost``, ``127.0.0.1``, ``*.<BASE_DOMAIN>`` and the demo tenants' hosts, so the
gateway's tenant hosts and the services on loopback all verify. Nothing here is for production: a cluster's certificates
come from its own issuer.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .seed import DEMO_TENANTS

#: How long the dev certificates are valid.
VALID_DAYS = 365


@dataclass(frozen=True)
class LocalTls:
    """The files ``make certs`` writes into one folder."""

    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def cert(self) -> Path:
        return self.folder / "tls.crt"

    @property
    def key(self) -> Path:
        return self.folder / "tls.key"

    def exists(self) -> bool:
        return all(path.is_file() for path in (self.ca_cert, self.cert, self.key))

    def gateway_env(self) -> dict[str, str]:
        """The gateway's settings that make it serve this pair."""
        return {"GATEWAY_TLS_CERT_FILE": str(self.cert), "GATEWAY_TLS_KEY_FILE": str(self.key)}

    def service_env(self) -> dict[str, str]:
        """Service-to-service TLS: every service serves this pair, every caller (the gateway too) trusts the CA."""
        return {
            "GRPC_TLS_CERT_FILE": str(self.cert),
            "GRPC_TLS_KEY_FILE": str(self.key),
            "GRPC_TLS_CA_FILE": str(self.ca_cert),
            "GATEWAY_UPSTREAM_TLS_CA_FILE": str(self.ca_cert),
        }


def local_tls(data_dir: Path) -> LocalTls:
    return LocalTls(data_dir / "tls")


def server_names(base_domain: str) -> list[x509.GeneralName]:
    """What the dev server certificate is valid for: loopback and every tenant host. The
    demo tenants' hosts are named as well: OpenSSL (curl, browsers) and gRPC's own clients
    refuse a wildcard right under a top-level name such as ``*.localhost``."""
    return [
        x509.DNSName("localhost"),
        x509.DNSName(f"*.{base_domain}"),
        *(x509.DNSName(f"{tenant}.{base_domain}") for tenant in DEMO_TENANTS),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]


def ensure_certificates(folder: Path, base_domain: str) -> LocalTls:
    """The CA (kept once made, so clients that trust it keep working) and a server pair
    for ``base_domain`` (made again when missing or made for another domain)."""
    tls = LocalTls(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    if not (tls.ca_cert.is_file() and tls.ca_key.is_file()):
        _write_ca(tls)
    names = server_names(base_domain)
    if not (tls.cert.is_file() and tls.key.is_file() and _names_of(tls.cert) == names):
        _write_server_pair(tls, names)
    return tls


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_ca(tls: LocalTls) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Towerco dev CA (make certs)")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(tls.ca_key, _pem_key(key))
    tls.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _write_server_pair(tls: LocalTls, names: list[x509.GeneralName]) -> None:
    ca_key = serialization.load_pem_private_key(tls.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(tls.key, _pem_key(key))
    tls.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _names_of(cert_file: Path) -> list[x509.GeneralName]:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
