"""TLS between the platform's processes, by configuration: off unless the files are given.

A service serves TLS when ``GRPC_TLS_CERT_FILE`` and ``GRPC_TLS_KEY_FILE`` are set (and
then only TLS: a plaintext client is refused at the handshake). Its calls to other
services go over TLS when ``GRPC_TLS_CA_FILE`` names the CA their certificates chain to;
each callee's certificate must name the host its ``<SERVICE>_TARGET`` uses (a Service's
DNS name in a cluster, ``127.0.0.1`` locally). The gateway's side is
``GATEWAY_UPSTREAM_TLS_CA_FILE`` (gateway/config.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from .environment import SettingsError, text

_SERVE_DOC = "a service serves TLS only (PEM certificate chain and key): both or neither; unset: plaintext"
GRPC_TLS_CERT_FILE = text("GRPC_TLS_CERT_FILE", "", _SERVE_DOC)
GRPC_TLS_KEY_FILE = text("GRPC_TLS_KEY_FILE", "", _SERVE_DOC)
GRPC_TLS_CA_FILE = text(
    "GRPC_TLS_CA_FILE",
    "",
    "the CA (PEM) a service's calls to other services verify them with: set, those calls use TLS; unset: plaintext",
)
GRPC_TLS_SETTINGS = (GRPC_TLS_CERT_FILE, GRPC_TLS_KEY_FILE, GRPC_TLS_CA_FILE)


@dataclass(frozen=True)
class GrpcTls:
    """How one process serves, and calls the other services: the files, or empty for plaintext."""

    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> GrpcTls:
        """From the environment; SettingsError when half a pair or a file that is not there is named."""
        tls = cls(GRPC_TLS_CERT_FILE.read(environ), GRPC_TLS_KEY_FILE.read(environ), GRPC_TLS_CA_FILE.read(environ))
        if bool(tls.cert_file) != bool(tls.key_file):
            raise SettingsError("set both GRPC_TLS_CERT_FILE and GRPC_TLS_KEY_FILE to serve TLS, or neither")
        for setting, path in zip(GRPC_TLS_SETTINGS, (tls.cert_file, tls.key_file, tls.ca_file), strict=True):
            if path and not Path(path).is_file():
                raise SettingsError(f"{setting.name} {path} does not exist")
        return tls

    @property
    def serves_tls(self) -> bool:
        return bool(self.cert_file)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """What the server listens with, or None for plaintext."""
        if not self.serves_tls:
            return None
        pair = (Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes())
        return grpc.ssl_server_credentials([pair])

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """What calls to other services verify them with, or None for plaintext."""
        if not self.ca_file:
            return None
        return grpc.ssl_channel_credentials(root_certificates=Path(self.ca_file).read_bytes())

    def channel(self, target: str) -> grpc.Channel:
        """A blocking channel to ``target`` (the dev stack's health checks and seeding)."""
        credentials = self.channel_credentials()
        if credentials is None:
            return grpc.insecure_channel(target)
        return grpc.secure_channel(target, credentials)
