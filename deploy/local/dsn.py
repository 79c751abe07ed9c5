"""The runtime roles' DSNs the dev stack hands its services (a deployment writes its own).

Only ``make run`` and the test stack make a runtime DSN out of the owner's: a service reads
its ``<SERVICE>_DATABASE_URL`` as given and never builds one.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit

from services.runtime.settings import runtime_role

#: The runtime roles' password in the dev stack (its embedded server trusts loopback anyway).
DEV_APP_DB_PASSWORD = "towerco-dev-only"  # noqa: S105 - the dev stack's own; a deployment names its DSNs


def dsn_with_user(dsn: str, user: str, password: str) -> str:
    """``dsn``'s host, port and database, logging in as ``user``."""
    parts = urlsplit(dsn)
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{quote(user)}:{quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def runtime_dsn(admin_dsn: str, service: str, password: str) -> str:
    """The runtime role's DSN: the owner DSN's host and database as ``<service>_app``."""
    return dsn_with_user(admin_dsn, runtime_role(service), password)
