"""How the README and the ``make run`` banner call the gateway with grpcurl, defined once.

The gateway routes by service and serves no reflection, so grpcurl needs the API's
descriptors from a file. ``make proto`` builds :data:`PROTOSET` with every proto, its
imports and ``google/rpc/error_details.proto``: without the latter grpcurl prints
``google.rpc.ErrorInfo is not recognized`` instead of an error's reason. The tests run
grpcurl with these flags and check that the README shows them.
"""

from __future__ import annotations

#: Relative to the repository root, where the README's commands are pasted.
PROTOSET = "gen/towerco.protoset"

#: The flags of every grpcurl example through the gateway, before -authority/-H/-d.
GATEWAY_FLAGS = ("-plaintext", "-protoset", PROTOSET)


def gateway_flags(ca_file: str = "") -> tuple[str, ...]:
    """:data:`GATEWAY_FLAGS`, or for a gateway serving TLS, the CA that verifies it instead of ``-plaintext``."""
    return ("-cacert", ca_file, "-protoset", PROTOSET) if ca_file else GATEWAY_FLAGS
