"""What a tenant may use, evaluated in memory on every call.

A tenant's *record* (its plan and per-tenant overrides) is the feature gate's. Every
process keeps records in a :class:`~services.runtime.tenant_cache.TenantCache` of their
own (own Redis channel, own version counter), so a plan change or an override made
through any process is seen by every process within milliseconds. Evaluation (override,
then plan, then the plans file's defaults) happens per call against this process's
clock, so an override stops applying the moment it expires, without any message.

When the feature gate has no record of a tenant (one provisioned before it existed), the
plan the registry holds for it applies without overrides. When nothing can be asked
(Redis and the feature gate both unreachable), the last known record is kept; a process
that never had one uses the registry's plan until the feature gate answers again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from google.protobuf import timestamp_pb2
from towerco.internal.v1 import entitlements_pb2, entitlements_pb2_grpc

from . import context
from .context import Bound
from .errors import ErrorReason, ServiceError, permission_denied
from .identity import ServiceIdentity
from .lookups import InternalLookup
from .plans import LIMITS, Plan, Plans
from .tenant_cache import TenantCache, Versioned
from .tenants import TenantDirectory

log = logging.getLogger("towerco.entitlements")

KIND = "entitlements"
CHANNEL = "towerco:entitlements-changed"

IN_PLAN = "IN_PLAN"
NOT_IN_PLAN = "NOT_IN_PLAN"
OVERRIDE_GRANTED = "OVERRIDE_GRANTED"
OVERRIDE_WITHHELD = "OVERRIDE_WITHHELD"


@dataclass(frozen=True)
class FeatureOverride:
    enabled: bool
    #: Seconds since the epoch when it stops applying; None: never.
    expires_at: float | None = None

    def applies(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at


@dataclass(frozen=True)
class Record:
    """A tenant's plan and overrides, as the feature gate stores them."""

    plan: str
    feature_overrides: Mapping[str, FeatureOverride] = field(default_factory=dict)
    limit_overrides: Mapping[str, int] = field(default_factory=dict)

    def next_expiry(self, now: float) -> float:
        """When the next override stops applying (infinity if none will)."""
        return min((o.expires_at for o in self.feature_overrides.values() if o.expires_at and o.expires_at > now),
                   default=math.inf)  # fmt: skip

    def as_value(self) -> dict[str, Any]:
        return {
            "plan": self.plan,
            "features": {k: [o.enabled, o.expires_at] for k, o in sorted(self.feature_overrides.items())},
            "limits": dict(sorted(self.limit_overrides.items())),
        }

    @classmethod
    def from_value(cls, value: Mapping[str, Any]) -> Record:
        return cls(
            plan=str(value["plan"]),
            feature_overrides={k: FeatureOverride(bool(v[0]), v[1]) for k, v in value.get("features", {}).items()},
            limit_overrides={k: int(v) for k, v in value.get("limits", {}).items()},
        )

    def to_proto(self, tenant_id: str, version: int) -> entitlements_pb2.TenantEntitlements:
        message = entitlements_pb2.TenantEntitlements(
            tenant_id=tenant_id, plan=self.plan, version=version, limit_overrides=dict(self.limit_overrides)
        )
        for name, override in sorted(self.feature_overrides.items()):
            item = message.feature_overrides.add(feature=name, enabled=override.enabled)
            if override.expires_at is not None:
                item.expire_time.CopyFrom(_timestamp(override.expires_at))
        return message

    @classmethod
    def from_proto(cls, message: entitlements_pb2.TenantEntitlements) -> Record:
        overrides = {
            o.feature: FeatureOverride(
                o.enabled, o.expire_time.ToNanoseconds() / 1e9 if o.HasField("expire_time") else None
            )
            for o in message.feature_overrides
        }
        return cls(message.plan, overrides, dict(message.limit_overrides))


@dataclass(frozen=True)
class Entitlements:
    """One tenant's entitlements at one moment: what every check reads."""

    tenant_id: str
    plan: str
    features: frozenset[str]
    limits: Mapping[str, int]
    #: Why each feature a plan or override names is on or off.
    reasons: Mapping[str, str]

    def feature(self, name: str) -> tuple[bool, str]:
        """Whether the tenant may use ``name``, and why (an unknown feature is off)."""
        return name in self.features, self.reasons.get(name, NOT_IN_PLAN)

    def limit(self, name: str) -> int:
        return self.limits[name]

    def refused(self, feature: str) -> ServiceError:
        """PERMISSION_DENIED for using ``feature`` without it, saying who can lift it: a larger
        plan (FEATURE_NOT_IN_PLAN), or only the platform's operator (FEATURE_WITHHELD_BY_OVERRIDE)."""
        why = self.feature(feature)[1]
        if why == OVERRIDE_WITHHELD:
            message = (
                f"{feature!r} is withheld from tenant {self.tenant_id!r} by an override a platform admin set, "
                f"whatever its plan ({self.plan!r}); ask the platform operator to clear it"
            )
            reason = ErrorReason.FEATURE_WITHHELD_BY_OVERRIDE
        else:
            message = (
                f"tenant {self.tenant_id!r} is on plan {self.plan!r}, which does not include {feature!r}; "
                "upgrade the plan or ask the platform operator"
            )
            reason = ErrorReason.FEATURE_NOT_IN_PLAN
        return permission_denied(message, reason, feature=feature, plan=self.plan, decided_by=why)


def evaluate(plans: Plans, tenant_id: str, record: Record, now: float | None = None) -> Entitlements:
    """Override, then plan, then default; expired overrides are ignored."""
    now = time.time() if now is None else now
    plan: Plan | None = plans.get(record.plan)
    if plan is None:
        log.warning("tenant %s is on plan %r, which the plans file no longer defines", tenant_id, record.plan)
    base = plan.features if plan else frozenset()
    reasons = dict.fromkeys(base, IN_PLAN)
    features = set(base)
    for name, override in record.feature_overrides.items():
        if not override.applies(now):
            continue
        reasons[name] = OVERRIDE_GRANTED if override.enabled else OVERRIDE_WITHHELD
        (features.add if override.enabled else features.discard)(name)
    limits = dict(plan.limits if plan else plans.default_limits)
    limits.update({k: v for k, v in record.limit_overrides.items() if k in LIMITS})
    return Entitlements(
        tenant_id, record.plan, frozenset(features), MappingProxyType(limits), MappingProxyType(reasons)
    )


_current: ContextVar[Entitlements | None] = ContextVar("towerco_entitlements", default=None)


def current() -> Entitlements | None:
    """The calling tenant's entitlements, as the interceptor chain found them for this call."""
    return _current.get()


def of_tenant_user_call() -> tuple[str, Entitlements] | None:
    """The calling tenant and its entitlements when the call is one of its own users' with its plan
    bound; None for platform admins', platform services' and public calls, which no plan limits."""
    found = _current.get()
    tenant_id = context.tenant_user_call()
    if found is None or tenant_id is None:
        return None
    return tenant_id, found


def bound(entitlements: Entitlements) -> Bound[Entitlements]:
    """The calling tenant's entitlements for the enclosed block (the entitlements link, each call)."""
    return Bound(_current, entitlements)


#: Reads a tenant's record from the feature gate: version 0 and no value if it has none.
RecordSource = Callable[[str], Awaitable[Versioned]]


class EntitlementDirectory:
    """Entitlements per tenant, from memory whenever possible."""

    def __init__(
        self,
        cache: TenantCache,
        source: RecordSource,
        plans: Plans,
        tenants: TenantDirectory,
        *,
        source_breaker_seconds: float = 1.0,
    ) -> None:
        self._cache = cache
        self._source = source
        self.plans = plans
        self._tenants = tenants
        self._breaker_seconds = source_breaker_seconds
        self._source_down_until = 0.0
        #: Per tenant: the cached item evaluated, the result, and until when it holds.
        self._evaluated: dict[str, tuple[Versioned, Entitlements, float]] = {}

    async def get(self, tenant_id: str) -> Entitlements | None:
        """The tenant's entitlements now; None for a tenant the platform does not know.

        Evaluated once per cached record and reused until the record changes or one of
        its overrides expires, so a call usually costs two dictionary lookups.
        """
        item = await self._cached(tenant_id)
        if item is None or item.value is None:
            record = await self._registry_plan(tenant_id)
            return None if record is None else evaluate(self.plans, tenant_id, record)
        now = time.time()
        hit = self._evaluated.get(tenant_id)
        if hit is not None and hit[0] is item and now < hit[2]:
            return hit[1]
        record = Record.from_value(item.value)
        found = evaluate(self.plans, tenant_id, record, now)
        self._evaluated[tenant_id] = (item, found, record.next_expiry(now))
        return found

    async def record(self, tenant_id: str) -> Record | None:
        """The tenant's stored plan and overrides (the registry's plan if the feature gate has none)."""
        item = await self._cached(tenant_id)
        if item is not None and item.value is not None:
            return Record.from_value(item.value)
        return await self._registry_plan(tenant_id)

    async def _cached(self, tenant_id: str) -> Versioned | None:
        if time.monotonic() < self._source_down_until:
            return self._cache.peek(tenant_id, KIND)
        try:
            return await self._cache.get(tenant_id, KIND, lambda: self._source(tenant_id))
        except Exception as exc:
            # Nothing cached and the feature gate unreachable: fall back, and stop asking
            # it on every call for a moment.
            self._source_down_until = time.monotonic() + self._breaker_seconds
            log.warning("feature gate unreachable for tenant %s (%s); using its registry plan", tenant_id, exc)
            return None

    async def _registry_plan(self, tenant_id: str) -> Record | None:
        info = await self._tenants.get(tenant_id)
        return None if info is None else Record(info.plan)

    async def publish(self, tenant_id: str, version: int, record: Record) -> None:
        """After a committed change (in the feature gate): store it and tell every process."""
        await self._cache.publish(tenant_id, version, {KIND: record.as_value()})


class FeatureGateSource(InternalLookup):
    """Asks the feature gate for a record, as this service."""

    def __init__(self, target: str, identity: ServiceIdentity, timeout: float = 1.0) -> None:
        super().__init__(target, identity, timeout)
        self._stub = entitlements_pb2_grpc.TenantEntitlementsServiceStub(self.channel)

    async def __call__(self, tenant_id: str) -> Versioned:
        request = entitlements_pb2.GetTenantEntitlementsRequest(tenant_id=tenant_id)
        reply = await self.ask(self._stub.GetTenantEntitlements, request)
        if reply is None:
            return Versioned(0, None)
        return Versioned(reply.version, Record.from_proto(reply).as_value())


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp
