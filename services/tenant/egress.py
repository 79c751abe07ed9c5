"""Host names and URLs the platform itself will connect to (webhooks, SMTP): public ones only.

A tenant must not be able to point the platform at its own network: loopback, private,
link-local and reserved addresses are refused in every spelling (IPv4-mapped and 6to4
IPv6, NAT64, numeric and octal IPv4 forms), as are names that never leave a private
network. A public name can still resolve to an internal address: whatever connects must
check the address it actually reaches with :func:`is_internal_address`.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

#: The longest URL accepted.
MAX_URL = 2048
#: Host names that never lead to the public internet.
INTERNAL_SUFFIXES = ("localhost", "local", "internal", "home.arpa")
_URL_CHARS = re.compile(r"^[\x21-\x7e]*$")
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_NUMBER_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def url_problem(url: str, *, public: bool) -> str | None:
    """Why ``url`` is not an acceptable ``https://`` URL, or None; ``public``: no internal hosts."""
    if len(url) > MAX_URL:
        return f"must be at most {MAX_URL} characters"
    if not _URL_CHARS.fullmatch(url) or "\\" in url:
        return "must be printable ASCII without spaces or backslashes (percent-encode the rest; punycode for hosts)"
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        _ = parts.port
    except ValueError:
        return "must be a valid https:// URL"
    if parts.scheme != "https" or not host:
        return "must be an https:// URL with a host, e.g. https://hooks.operator.example/alerts"
    if "@" in parts.netloc:
        return "must not carry a user name or password"
    return host_problem(host, public=public)


def host_problem(host: str, *, public: bool) -> str | None:
    """Why ``host`` is not a host name or IP address (an internal one, when ``public``), or None.

    Numeric forms resolvers accept (``2130706433``, ``0x7f.1``, ``127.1``) count as the
    address they spell; a trailing dot is ignored, as resolvers do. A public name can still
    resolve to an internal address: whatever connects must check the address it resolved.
    """
    name = host.lower().removesuffix(".")
    address = _ip_address(name)
    if address is not None:
        if public and is_internal_address(address):
            return "must not be a loopback, private, link-local, multicast or otherwise reserved address"
        return None
    labels = name.split(".")
    if len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels) or _NUMBER_LABEL.match(labels[-1]):
        return "must be a host name such as hooks.operator.example, or an IP address"
    if public:
        if name in INTERNAL_SUFFIXES or name.endswith(tuple("." + suffix for suffix in INTERNAL_SUFFIXES)):
            return "must not be a local or internal host name (localhost, *.local, *.internal)"
        if len(labels) < 2:
            return "must be a fully qualified host name such as hooks.operator.example"
    return None


def is_internal_address(address: Address) -> bool:
    """True for every address that is not plainly a public unicast one, IPv4 ones inside IPv6 included."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in _LOCAL_NAT64:
            return True
        inner = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
        if address in _NAT64:
            inner.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if any(v4 is not None and is_internal_address(v4) for v4 in inner):
            return True
    return (
        not address.is_global
        or address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def _ip_address(name: str) -> Address | None:
    if ":" in name:
        try:
            return ipaddress.IPv6Address(name)
        except ValueError:
            return None
    return _ipv4(name)


def _ipv4(name: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address ``name`` spells as inet_aton reads it (1-4 parts, octal, hex), else None."""
    parts = name.split(".")
    if not 1 <= len(parts) <= 4 or not all(_NUMBER_LABEL.fullmatch(part) for part in parts):
        return None
    try:
        numbers = [
            int(part[2:] or "0", 16) if part.startswith("0x") else int(part, 8 if part.startswith("0") else 10)
            for part in parts
        ]
    except ValueError:  # 08, 09: not octal
        return None
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(parts)):
        return None
    value = 0
    for n in head:
        value = value * 256 + n
    return ipaddress.IPv4Address(value * 256 ** (5 - len(parts)) + last)
