"""Prometheus metrics of a service process: every metric, its labels, and what bounds them.

Every metric is declared here, once, with its labels; the README's metrics table is made
from these declarations (``python -m deploy.local.settings_doc``) and a test fails on drift.
Code records through :func:`active` (the process's :class:`ServiceMetrics`, configured at
start-up with the service's name), which keeps each label combination's child so a call
costs dictionary look-ups, not ``labels()``.

Cardinality is bounded: no label carries a free-form value. ``tenant`` (and the target of
a cross-tenant refusal) is the tenant id for the first ``METRICS_TENANT_LABEL_CAP`` tenants
a process meets and :data:`OTHER_TENANT` for every one after; a call with no tenant is
:data:`NO_TENANT`, a platform admin's or service's :data:`PLATFORM_CALLER`. ``method`` is a
declared RPC's full name (undeclared ones never reach the chain), ``code`` a gRPC status name.

With ``PROMETHEUS_MULTIPROC_DIR`` set (several worker processes of one service), the client
library keeps the values in files there and ``/metrics`` serves their sum over the workers
(gauges: the largest live value); the directory must be emptied before the workers start.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.metrics import MetricWrapperBase

from .context import Bound

# No ``*_created`` series: they would double the series per tenant and nothing reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: The label value of every tenant past the cap.
OTHER_TENANT = "_other"
#: The label value of a call bound to no tenant (public calls that name none, calls refused
#: before their tenant is known).
NO_TENANT = "_none"
#: The label value of the calls of platform admins and platform services, whichever tenant
#: they act on: a tenant's numbers are its own users' calls.
PLATFORM_CALLER = "_platform"
#: ``service`` before :func:`configure` (unit tests, tools).
UNCONFIGURED = "unconfigured"
DEFAULT_TENANT_LABEL_CAP = 1000

#: What became of a tenant's call (``towerco_tenant_calls_total{outcome}``), by gRPC status:
#: refused is the platform turning the call away by policy (authentication, permission,
#: tenant state, cross-tenant, plan, rate and concurrency limits); server_error is the
#: platform failing it (what availability SLOs count); client_error is the request's fault.
OUTCOME_BY_CODE: dict[str, str] = {
    "OK": "ok",
    "UNAUTHENTICATED": "refused",
    "PERMISSION_DENIED": "refused",
    "RESOURCE_EXHAUSTED": "refused",
    "INTERNAL": "server_error",
    "UNKNOWN": "server_error",
    "DATA_LOSS": "server_error",
    "UNAVAILABLE": "server_error",
    "DEADLINE_EXCEEDED": "server_error",
    "UNIMPLEMENTED": "server_error",
}
#: Any other code (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, ABORTED,
#: OUT_OF_RANGE, CANCELLED) is the caller's.
CLIENT_ERROR = "client_error"
OUTCOMES = ("ok", CLIENT_ERROR, "refused", "server_error")

#: Latency buckets (seconds) of both histograms; the SLO thresholds must be among them.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

TENANT_CALLS = Counter(
    "towerco_tenant_calls_total",
    "Calls bound to a tenant, by the method's rate class and outcome (ok, client_error, refused, server_error)",
    ("tenant", "service", "rate_class", "outcome"),
)
TENANT_CALL_DURATION = Histogram(
    "towerco_tenant_call_duration_seconds",
    "Time the service took to answer a tenant's call, refusals included (a refusal's deliberate hold not)",
    ("tenant", "service"),
    buckets=LATENCY_BUCKETS,
)
TENANT_RATE_LIMITED = Counter(
    "towerco_tenant_rate_limited_total",
    "Calls refused RESOURCE_EXHAUSTED RATE_LIMITED over the tenant's rpm_read or rpm_write",
    ("tenant", "service", "rate_class"),
)
TENANT_DB_SECONDS = Counter(
    "towerco_tenant_db_seconds_total",
    "Seconds of database transactions bound to the tenant (the basis of cost allocation)",
    ("tenant", "service"),
)
RPC_CALLS = Counter(
    "towerco_rpc_calls_total", "Calls by method and gRPC status code, all tenants", ("service", "method", "code")
)
RPC_DURATION = Histogram(
    "towerco_rpc_duration_seconds", "Time to answer a call, by method", ("service", "method"), buckets=LATENCY_BUCKETS
)
TENANT_CACHE_REQUESTS = Counter(
    "towerco_tenant_cache_requests_total",
    "Look-ups of tenant state and entitlements answered from the process's memory (hit) or not (miss)",
    ("service", "result"),
)
BULKHEAD_WAITS = Counter(
    "towerco_bulkhead_waits_total",
    "Calls that had to wait for one of their tenant's database slots",
    ("service",),
)
BULKHEAD_REFUSALS = Counter(
    "towerco_bulkhead_refusals_total",
    "Calls refused RESOURCE_EXHAUSTED TENANT_CONCURRENCY_LIMIT after waiting for a slot in vain",
    ("service",),
)
TENANT_CALLS_LIMITED = Counter(
    "towerco_tenant_calls_limited_total",
    "Calls refused RESOURCE_EXHAUSTED TENANT_CALLS_LIMIT: the tenant already had its call_concurrency in flight",
    ("tenant", "service"),
)
REFUSALS_HELD = Counter(
    "towerco_refusals_held_total",
    "RESOURCE_EXHAUSTED refusals with a retry-after held before being answered (held), or answered at once "
    "because REFUSAL_HOLD_MAX_HELD were held already (over_cap)",
    ("service", "result"),
)
BREAKER_OPEN = Gauge(
    "towerco_breaker_open",
    "1 while the service has stopped asking a dependency after failures (its circuit breaker is open), else 0",
    ("service", "dependency"),
    multiprocess_mode="livemax",
)
DEPENDENCY_ERRORS = Counter(
    "towerco_dependency_errors_total",
    "Failed attempts to reach a dependency (redis or postgres)",
    ("service", "dependency"),
)
AUDIT_OUTBOX_DEPTH = Gauge(
    "towerco_audit_outbox_depth",
    "Audit events in the service's outbox not yet delivered to the audit service, at the relay's last round",
    ("service",),
    multiprocess_mode="livemax",
)
AUDIT_RELAY_LAG = Gauge(
    "towerco_audit_relay_lag_seconds",
    "Age of the oldest undelivered audit event at the relay's last round (0: none waiting)",
    ("service",),
    multiprocess_mode="livemax",
)
CROSS_TENANT_REFUSALS = Counter(
    "towerco_cross_tenant_refusals_total",
    "Calls refused CROSS_TENANT_DENIED, by the tenant they named (capped like tenant)",
    ("service", "target"),
)
ISOLATION_BREACH = Counter(
    "towerco_isolation_breach_total",
    "Times the leak canary saw one canary tenant's rows from the other: tenant isolation is broken",
    ("service",),
)
RETENTION_PURGED_ROWS = Counter(
    "towerco_retention_purged_rows_total",
    "Rows deleted because their retention period ended (by a service's own purge task), by table",
    ("service", "table"),
)

#: Every metric, in the README's order.
ALL: tuple[MetricWrapperBase, ...] = (
    TENANT_CALLS,
    TENANT_CALL_DURATION,
    TENANT_RATE_LIMITED,
    TENANT_DB_SECONDS,
    RPC_CALLS,
    RPC_DURATION,
    TENANT_CACHE_REQUESTS,
    BULKHEAD_WAITS,
    BULKHEAD_REFUSALS,
    TENANT_CALLS_LIMITED,
    REFUSALS_HELD,
    BREAKER_OPEN,
    DEPENDENCY_ERRORS,
    AUDIT_OUTBOX_DEPTH,
    AUDIT_RELAY_LAG,
    CROSS_TENANT_REFUSALS,
    ISOLATION_BREACH,
    RETENTION_PURGED_ROWS,
)


BEGIN_MARKER = "<!-- metrics table: generated by `make settings-doc` from services/runtime/metrics.py; do not edit -->"
END_MARKER = "<!-- end of metrics table -->"


def markdown_table() -> str:
    """The README's table: one row per metric, its type, labels and meaning."""
    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for metric in ALL:
        kind = str(metric._type)
        name = str(metric._name) + ("_total" if kind == "counter" else "")
        labels = ", ".join(f"`{label}`" for label in metric._labelnames)
        lines.append(f"| `{name}` | {kind} | {labels} | {metric._documentation} |")
    return "\n".join(lines) + "\n"


def with_table(readme: str) -> str:
    """``readme`` with the text between the metrics table's markers made from :data:`ALL`."""
    head, begin, rest = readme.partition(BEGIN_MARKER)
    _, end, tail = rest.partition(END_MARKER)
    if not begin or not end:
        raise ValueError(f"README lacks the markers {BEGIN_MARKER!r} ... {END_MARKER!r}")
    return f"{head}{BEGIN_MARKER}\n{markdown_table()}{END_MARKER}{tail}"


def outcome(code_name: str) -> str:
    """The outcome label of a call that ended with the gRPC status named ``code_name``."""
    return OUTCOME_BY_CODE.get(code_name, CLIENT_ERROR)


class TenantLabels:
    """Tenant ids as label values: the first ``cap`` seen keep their id, later ones share ``_other``."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._labels: dict[str, str] = {}

    def __call__(self, tenant_id: str | None) -> str:
        if tenant_id is None:
            return NO_TENANT
        label = self._labels.get(tenant_id)
        if label is None:
            label = tenant_id if len(self._labels) < self.cap else OTHER_TENANT
            if label != OTHER_TENANT:
                self._labels[tenant_id] = label
        return label

    def __len__(self) -> int:
        return len(self._labels)


class _Children:
    """One metric's children by label values, bound to the service: ``labels()`` once per combination."""

    def __init__(self, metric: MetricWrapperBase, service: str) -> None:
        self._metric = metric
        self._service = service
        self._children: dict[tuple[str, ...], Any] = {}
        self._first = metric._labelnames.index("service")

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            labels = list(values)
            labels.insert(self._first, self._service)
            child = self._children[values] = self._metric.labels(*labels)
        return child


class ServiceMetrics:
    """What one service process records; every method is cheap enough for the request path."""

    def __init__(self, service: str, tenant_label_cap: int = DEFAULT_TENANT_LABEL_CAP) -> None:
        self.service = service
        self.tenant = TenantLabels(tenant_label_cap)
        self._of: Callable[[MetricWrapperBase], _Children] = lambda metric: _Children(metric, service)
        self._calls = self._of(TENANT_CALLS)
        self._call_duration = self._of(TENANT_CALL_DURATION)
        self._rate_limited = self._of(TENANT_RATE_LIMITED)
        self._db_seconds = self._of(TENANT_DB_SECONDS)
        self._rpc_calls = self._of(RPC_CALLS)
        self._rpc_duration = self._of(RPC_DURATION)
        self._cache = self._of(TENANT_CACHE_REQUESTS)
        self._breaker = self._of(BREAKER_OPEN)
        self._dependency_errors = self._of(DEPENDENCY_ERRORS)
        self._cross_tenant = self._of(CROSS_TENANT_REFUSALS)
        self._purged = self._of(RETENTION_PURGED_ROWS)
        self._calls_limited = self._of(TENANT_CALLS_LIMITED)
        self._waits = BULKHEAD_WAITS.labels(service)
        self._refusals = BULKHEAD_REFUSALS.labels(service)
        self._held = REFUSALS_HELD.labels(service, "held")
        self._over_cap = REFUSALS_HELD.labels(service, "over_cap")
        self._outbox_depth = AUDIT_OUTBOX_DEPTH.labels(service)
        self._relay_lag = AUDIT_RELAY_LAG.labels(service)
        self._breaches = ISOLATION_BREACH.labels(service)
        self._open_breakers: dict[str, set[str]] = {}

    def call(self, tenant_id: str | None, rate_class: str, method: str, code_name: str, seconds: float) -> None:
        """One call answered with ``code_name`` after ``seconds``, bound to ``tenant_id``."""
        tenant = self.tenant(tenant_id)
        self._calls(tenant, rate_class, outcome(code_name)).inc()
        self._call_duration(tenant).observe(seconds)
        self._rpc_calls(method, code_name).inc()
        self._rpc_duration(method).observe(seconds)

    def rate_limited(self, tenant_id: str, rate_class: str) -> None:
        self._rate_limited(self.tenant(tenant_id), rate_class).inc()

    def db_time(self, tenant_id: str, seconds: float) -> None:
        self._db_seconds(self.tenant(tenant_id)).inc(seconds)

    def cache_lookup(self, hit: bool) -> None:
        self._cache("hit" if hit else "miss").inc()

    def bulkhead_wait(self) -> None:
        self._waits.inc()

    def bulkhead_refusal(self) -> None:
        self._refusals.inc()

    def calls_limited(self, tenant_id: str) -> None:
        self._calls_limited(self.tenant(tenant_id)).inc()

    def refusal_held(self, *, over_cap: bool) -> None:
        (self._over_cap if over_cap else self._held).inc()

    def breaker(self, dependency: str, breaker: str, *, is_open: bool) -> None:
        """One of the process's breakers in front of ``dependency`` opened or closed: 1 while any is open."""
        opened = self._open_breakers.setdefault(dependency, set())
        if is_open:
            opened.add(breaker)
        else:
            opened.discard(breaker)
        self._breaker(dependency).set(1 if opened else 0)

    def dependency_error(self, dependency: str) -> None:
        self._dependency_errors(dependency).inc()

    def outbox(self, depth: int, lag_seconds: float) -> None:
        self._outbox_depth.set(depth)
        self._relay_lag.set(lag_seconds)

    def cross_tenant_refusal(self, target: str) -> None:
        self._cross_tenant(self.tenant(target)).inc()

    def isolation_breach(self) -> None:
        self._breaches.inc()

    def retention_purged(self, table: str, rows: int) -> None:
        self._purged(table).inc(rows)


_active = ServiceMetrics(UNCONFIGURED)


def configure(service: str, tenant_label_cap: int = DEFAULT_TENANT_LABEL_CAP) -> ServiceMetrics:
    """Make the process's metrics ``service``'s (at start-up, before serving)."""
    global _active
    _active = ServiceMetrics(service, tenant_label_cap)
    return _active


def active() -> ServiceMetrics:
    """The process's metrics."""
    return _active


@dataclass
class CallRecord:
    """What the metrics link learns of a call from links further in (its tenant, a refusal's hold)."""

    tenant_id: str | None = None
    held_seconds: float = 0.0


_call: ContextVar[CallRecord | None] = ContextVar("towerco_metrics_call", default=None)


def note_tenant(tenant_id: str, *, by_platform: bool) -> None:
    """Tell the metrics link which tenant the call is bound to (the tenant link calls it)."""
    record = _call.get()
    if record is not None:
        record.tenant_id = PLATFORM_CALLER if by_platform else tenant_id


def note_held(seconds: float) -> None:
    """Tell the metrics link the call's refusal was held ``seconds`` on purpose (not the service's time)."""
    record = _call.get()
    if record is not None:
        record.held_seconds += seconds


def recording() -> Bound[CallRecord]:
    """A fresh :class:`CallRecord` for the enclosed call, which :func:`note_tenant` fills."""
    return Bound(_call, CallRecord())
