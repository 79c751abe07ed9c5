"""What a ``REDIS_URL`` names: one Redis server, or the nodes of a Redis Cluster.

``redis://`` (and ``rediss://``, ``unix://``) is one server, as redis-py reads it.
``redis+cluster://[user[:password]@]host:port[,host:port...][/0]`` is a Cluster: the
nodes listed are where a client starts (it learns the others from them), so listing a
few of the masters is enough. A Cluster has only database 0, and nothing else may follow.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from .environment import SettingsError

CLUSTER_SCHEME = "redis+cluster"
DEFAULT_PORT = 6379


@dataclass(frozen=True)
class ClusterAddress:
    """The start-up nodes of a Redis Cluster and the credentials for all of them."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None


def cluster_address(url: str) -> ClusterAddress | None:
    """The Cluster ``url`` names, or None for a single server's URL.

    Raises ValueError, saying what is wrong, for a ``redis+cluster://`` URL it cannot use.
    """
    scheme, separator, rest = url.partition("://")
    if not separator or scheme.lower() != CLUSTER_SCHEME:
        return None
    location, _, path = rest.partition("/")
    if "?" in location or path not in ("", "0"):
        raise ValueError(f"a {CLUSTER_SCHEME}:// URL ends with its nodes or /0 (a Cluster has only database 0)")
    userinfo, _, hosts = location.rpartition("@")
    username, has_password, password = userinfo.partition(":")
    nodes = tuple(_node(part) for part in hosts.split(","))
    return ClusterAddress(
        nodes,
        username=unquote(username) or None,
        password=unquote(password) if has_password else None,
    )


def _node(part: str) -> tuple[str, int]:
    host, colon, port = part.strip().rpartition(":")
    if not colon:
        host, port = port, str(DEFAULT_PORT)
    host = host.removeprefix("[").removesuffix("]")  # [::1]:7000
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{CLUSTER_SCHEME}:// node {part!r} is not host:port")
    return host, int(port)


def parse_redis_url(name: str, raw: str) -> str:
    """``REDIS_URL``'s parser: the URL as given, once a Cluster URL is known to be usable."""
    try:
        cluster_address(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from exc
    return raw
