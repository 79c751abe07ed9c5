"""Per-RPC access policies, read from the ``(towerco.api.v1.policy)`` method option.

The table is built once at start-up from the descriptors of the services a process
serves. A method without a policy stops the process from starting: no RPC is ever
served without a declared permission.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from google.protobuf.descriptor import Descriptor, ServiceDescriptor
from towerco.api.v1 import policy_pb2


class PolicyError(RuntimeError):
    """A served RPC has no usable policy declaration."""


@dataclass(frozen=True)
class Policy:
    """What a caller needs to call one method."""

    method: str
    permission: str
    public: bool = False
    cross_tenant: bool = False
    internal: bool = False
    write: bool = True
    #: A feature the tenant's entitlements must include, or "".
    feature: str = ""
    #: The method's request message type (for checks that read requests), when known.
    request_type: Descriptor | None = field(default=None, compare=False, repr=False)

    @property
    def rate_class(self) -> str:
        return "write" if self.write else "read"

    @property
    def rate_limit(self) -> str:
        """The tenant limit a call of this method counts against (RATE_LIMITED's ``limit``)."""
        return rate_limit_of(self.rate_class)

    @property
    def domain(self) -> str:
        """The ErrorInfo domain of errors from this method: its service's full name."""
        return self.method.strip("/").split("/", 1)[0]


def rate_limit_of(rate_class: str) -> str:
    """The entitlement limit (``rpm_read``, ``rpm_write``) that bounds ``rate_class``'s calls."""
    return f"rpm_{rate_class}"


class PolicyTable:
    """Policies by full method path (``/towerco.sites.v1.SiteService/GetSite``)."""

    def __init__(self, policies: Iterable[Policy]) -> None:
        self._by_method = {p.method: p for p in policies}

    @classmethod
    def from_services(cls, services: Iterable[ServiceDescriptor]) -> PolicyTable:
        policies: list[Policy] = []
        missing: list[str] = []
        for service in services:
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                if method.client_streaming or method.server_streaming:
                    raise PolicyError(f"{path}: streaming RPCs are not supported by the interceptor chain yet")
                options = method.GetOptions()
                if not options.HasExtension(policy_pb2.policy):
                    missing.append(path)
                    continue
                declared = options.Extensions[policy_pb2.policy]
                if not declared.public and not declared.permission:
                    missing.append(path)
                    continue
                policies.append(
                    Policy(
                        method=path,
                        permission=declared.permission,
                        public=declared.public,
                        cross_tenant=declared.platform_admin_cross_tenant,
                        internal=declared.internal,
                        write=declared.rate_class != policy_pb2.RATE_CLASS_READ,
                        feature=declared.feature,
                        request_type=method.input_type,
                    )
                )
        if missing:
            raise PolicyError("RPCs without a (towerco.api.v1.policy) permission: " + ", ".join(missing))
        return cls(policies)

    def get(self, method: str) -> Policy | None:
        return self._by_method.get(method)

    def __contains__(self, method: str) -> bool:
        return method in self._by_method

    def __iter__(self) -> Iterator[Policy]:
        return iter(self._by_method.values())
