"""Host names: how a request's host becomes a tenant, and which domains a tenant may claim."""

from __future__ import annotations

import re

from services.runtime.canary import CANARY_TENANTS
from services.runtime.context import is_valid_tenant_id

#: Names no tenant may take: they are (or may become) the platform's own hosts, or are
#: the isolation canaries' (services/runtime/canary.py).
RESERVED_TENANT_IDS = frozenset(
    {"www", "api", "admin", "platform", "gateway", "app", "auth", "login", "static", "assets", "mail", "status",
     "docs", "support", "internal", "system", "root", "towerco", *CANARY_TENANTS}
)  # fmt: skip

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_PORT = re.compile(r":\d{1,5}$")
MAX_DOMAINS = 20


def normalize(host: str) -> str | None:
    """Lower-case ``host`` without ``:port`` or trailing dot; None if it is not a host name."""
    host = host.strip().lower()
    host = _PORT.sub("", host).rstrip(".")
    if not host or len(host) > 253:
        return None
    labels = host.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return None
    return host


def subdomain_tenant(host: str, base_domain: str) -> str | None:
    """``tenant_a`` for ``tenant_a.<base_domain>``; None for any other host."""
    suffix = "." + base_domain
    if not host.endswith(suffix):
        return None
    label = host[: -len(suffix)]
    return label if "." not in label and is_valid_tenant_id(label) else None


def domain_problem(domain: str, base_domain: str) -> str | None:
    """Why ``domain`` cannot be a tenant's custom domain, or None if it can."""
    if domain != domain.strip().lower():
        return "must be lower-case with no spaces"
    host = normalize(domain)
    if host is None or host != domain or "_" in host:
        return "must be a host name such as noc.operator.example (letters, digits, '-' and dots)"
    if "." not in host:
        return "must be a fully qualified host name (at least two labels)"
    if host == base_domain or host.endswith("." + base_domain):
        return f"must not be under the platform's own domain {base_domain!r}"
    if all(part.isdigit() for part in host.split(".")):
        return "must be a host name, not an IP address"
    return None
