"""Call metadata: the bearer token, the tenant header and whatever else a test sends."""

from __future__ import annotations

# What a call's ``metadata=`` takes.
Metadata = tuple[tuple[str, str], ...]


def bearer(token: str, tenant: str | None = None, **extra: str) -> Metadata:
    metadata = [("authorization", f"Bearer {token}")]
    if tenant is not None:
        metadata.append(("x-tenant-id", tenant))
    metadata.extend(extra.items())
    return tuple(metadata)
