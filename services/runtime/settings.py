"""Process settings: the environment variables a service process reads, once, at start-up.

Not the tenant settings (the TenantSettings resource a tenant edits through the API):
those are ``services/tenant/tenant_settings_rules.py`` and ``tenant_settings_store.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from . import logs
from .cells import CELL_DATABASE_URLS, CELLS, Cell, cell_dsns, check_cell_dsns, parse_cell_dsns
from .environment import (
    Setting,
    SettingsError,
    SettingsTable,
    flag,
    integer,
    number,
    process_environment,
    seconds,
    text,
)
from .plans import DEFAULT_PLANS_FILE
from .redis_url import parse_redis_url
from .tls import GRPC_TLS_SETTINGS, GrpcTls

__all__ = ["Settings", "SettingsError", "load"]

#: Default ports of the four services (each overridable by ``<NAME>_PORT``).
DEFAULT_PORTS: dict[str, int] = {"tenant": 50051, "sites": 50052, "features": 50053, "audit": 50054}
#: Default ports of their Prometheus ``/metrics`` (each overridable by ``<NAME>_METRICS_PORT``).
DEFAULT_METRICS_PORTS: dict[str, int] = {"tenant": 9461, "sites": 9462, "features": 9463, "audit": 9464}


DEFAULT_JWT_ISSUER = "towerco-dev-issuer"
DEFAULT_JWT_AUDIENCE = "towerco-aiops"
#: Issuer of the tokens the platform's services present to each other (never users).
DEFAULT_SERVICE_JWT_ISSUER = "towerco-services"
DEV_SERVICE_KEY_ID = "towerco-service-dev-1"
#: The dev gateway secret's file under the keys folder (``GATEWAY_SECRET`` in a deployment).
GATEWAY_SECRET_FILE = "gateway.secret"  # noqa: S105 - a file name, not a secret


# The variables a service process reads, each declared once (the README's table is made from these).

#: Where local state lives; read by every process kind (services, gateway, dev stack).
DATA_DIR = text(
    "DATA_DIR",
    "",
    "where local state lives: the embedded servers' data and the dev keys (`keys/`)",
    shown="`.data/` of the working directory (`make` sets the checkout's)",
)
MIGRATION_DATABASE_URL = text(
    "MIGRATION_DATABASE_URL",
    "",
    "the owner's (administrative) DSN, read only to migrate: `python -m services.<name> migrate` (the "
    "migration Job) or `MIGRATE_ON_START`. It creates the roles and schemas and sets the runtime role's password "
    "to the one in `<SERVICE>_DATABASE_URL`; a serving pod never holds it",
    shown="none; `make run` migrates with its own",
)
DATABASE_URLS: dict[str, Setting[str]] = {
    name: text(
        f"{name.upper()}_DATABASE_URL",
        "",
        "the service's runtime role `<service>_app` (never an owner, superuser or BYPASSRLS), used exactly as "
        "given: a service refuses to start without its own",
        shown="none; `make run` sets each",
    )
    for name in DEFAULT_PORTS
}
REDIS_URL = Setting(
    "REDIS_URL",
    "redis://127.0.0.1:56379/0",
    "Redis: `redis://host:port/0` one server, `redis+cluster://host:port,host:port,...` a Redis Cluster "
    "(nodes to start from; see Redis Cluster); `make run` starts an embedded server unless it is set",
    parse_redis_url,
    "text",
    shown="embedded server on 56379",
)
PORTS: dict[str, Setting[int]] = {
    name: integer(f"{name.upper()}_PORT", port, "gRPC ports of the services") for name, port in DEFAULT_PORTS.items()
}
GRPC_BIND_HOST = text("GRPC_BIND_HOST", "127.0.0.1", "where the services listen: set `0.0.0.0` in a pod")
WORKERS: dict[str, Setting[int]] = {
    name: integer(
        f"{name.upper()}_WORKERS",
        1,
        "worker processes of each service, sharing its gRPC port (SO_REUSEPORT: the kernel spreads connections, not "
        "calls) and its `/metrics` (summed); above 1 a parent process starts them, forwards SIGTERM and stops them all "
        "when one dies (README: Processes and limits). Pods keep 1: replicas scale instead",
        minimum=1,
        shown="`1`; `make run`: the machine's cores",
    )
    for name in DEFAULT_PORTS
}
METRICS_PORTS: dict[str, Setting[int]] = {
    name: integer(
        f"{name.upper()}_METRICS_PORT",
        port,
        "HTTP ports of the services' Prometheus `/metrics`, on `GRPC_BIND_HOST`; `0`: none",
        minimum=0,
    )
    for name, port in DEFAULT_METRICS_PORTS.items()
}
METRICS_TENANT_LABEL_CAP = integer(
    "METRICS_TENANT_LABEL_CAP",
    1000,
    "most tenants a process names in metrics' `tenant` and `target` labels; later ones share `_other`",
    minimum=1,
)
PROMETHEUS_MULTIPROC_DIR = text(
    "PROMETHEUS_MULTIPROC_DIR",
    "",
    "several worker processes of one service: an empty folder they share (read by prometheus-client); "
    "`/metrics` then serves the sum over the workers",
    shown="unset: one process",
)
JWT_ISSUER = text("JWT_ISSUER", DEFAULT_JWT_ISSUER, "pinned claims of users' tokens (`make token` signs with them)")
JWT_AUDIENCE = text("JWT_AUDIENCE", DEFAULT_JWT_AUDIENCE, JWT_ISSUER.doc)
_JWKS_DOC = (
    "keys that verify users' tokens: a file (dev) or the identity provider's URL (production); "
    "the gateway takes exactly one"
)
JWT_JWKS_FILE = text("JWT_JWKS_FILE", "", _JWKS_DOC, shown="`$DATA_DIR/keys/jwks.json` unless `JWT_JWKS_URL`")
JWT_JWKS_URL = text("JWT_JWKS_URL", "", _JWKS_DOC)
JWT_LEEWAY_SECONDS = integer(
    "JWT_LEEWAY_SECONDS", 30, "clock skew allowed when checking a token's `exp` and `nbf`, in seconds"
)
PAGE_TOKEN_SECRET = text(
    "PAGE_TOKEN_SECRET",
    "",
    "signs page tokens; same value on every replica (a service refuses to start without it or the dev file)",
    shown="`$DATA_DIR/keys/page-token.secret`",
)
GATEWAY_SECRET = text(
    "GATEWAY_SECRET",
    "",
    "the gateway (Envoy's environment) and every service: a call carrying it in `x-towerco-gateway` is the "
    "gateway's, and only its `x-forwarded-for` is believed; unset on a service, none is",
    shown=f"`$DATA_DIR/keys/{GATEWAY_SECRET_FILE}`",
)
AUDIT_REFUSAL_WINDOW_SECONDS = seconds(
    "AUDIT_REFUSAL_WINDOW_SECONDS",
    60.0,
    "refused cross-tenant attempts are audited once per caller, target and method per window, with their count",
)
CANARY_INTERVAL_SECONDS = seconds(
    "CANARY_INTERVAL_SECONDS",
    30.0,
    "how often the isolation canary checks, as one reserved canary tenant, that the other's rows are invisible "
    "(`towerco_isolation_breach_total`, health NOT_SERVING on a breach)",
)
AUDIT_RETENTION_INTERVAL_SECONDS = seconds(
    "AUDIT_RETENTION_INTERVAL_SECONDS",
    3600.0,
    "how often the audit service's retention job purges each tenant's events older than its plan's "
    "`audit_retention_days` (only with `AUDIT_RETENTION_DATABASE_URL`)",
)
AUDIT_RETENTION_BATCH_SIZE = integer(
    "AUDIT_RETENTION_BATCH_SIZE",
    1000,
    "audit events the retention job deletes per transaction: a call waits on the purge for one batch at most",
    minimum=1,
)
AUDIT_RETENTION_DATABASE_URL = text(
    "AUDIT_RETENTION_DATABASE_URL",
    "",
    "a DSN whose role may `SET ROLE audit_retention` (services/audit/retention.py), read by the audit service's "
    "retention job and `python -m services.audit retention`; unset, the audit service runs no retention job",
    shown="none: no retention job (`make run` sets the dev stack's administrative DSN)",
)
AUDIT_RETENTION_CELL_DATABASE_URLS = cell_dsns(
    "AUDIT_RETENTION_CELL_DATABASE_URLS",
    "with `AUDIT_RETENTION_DATABASE_URL` and more than one cell: the same kind of DSN for every other cell, as "
    "`cell=DSN` pairs separated by spaces; the retention job purges each cell's tenants",
)
TENANT_MOVER_DATABASE_URLS: Setting[tuple[tuple[str, str], ...]] = Setting(
    "TENANT_MOVER_DATABASE_URLS",
    (),
    "the registry's DSN of EVERY cell, the home cell's too, as `cell=DSN` pairs separated by spaces, for "
    "MoveTenant (README: Moving a tenant): a role that reads and writes every service's tenant rows (bypassing "
    "RLS), may `SET ROLE audit_retention` and write `platform_meta.tenants_away`; unset, MoveTenant is refused",
    parse_cell_dsns,
    "`cell=DSN ...`",
    shown="none: no moves (`make run` with `CELLS=2` sets the dev stack's administrative DSNs)",
)
IDEMPOTENCY_WINDOW_SECONDS = seconds(
    "IDEMPOTENCY_WINDOW_SECONDS",
    86400.0,
    "how long a create's `request_id` is honoured: a retry within it gets the first answer; after it the record "
    "is purged and a reuse is a new request (ALREADY_EXISTS where the resource still exists)",
)
IDEMPOTENCY_PURGE_INTERVAL_SECONDS = seconds(
    "IDEMPOTENCY_PURGE_INTERVAL_SECONDS",
    600.0,
    "how often a service deletes the idempotency records older than `IDEMPOTENCY_WINDOW_SECONDS`, per tenant in "
    "batches (`towerco_retention_purged_rows_total`)",
)
USAGE_RETENTION_DAYS = integer(
    "USAGE_RETENTION_DAYS",
    760,
    "days the feature gate keeps each tenant's hourly usage (`features.usage_hourly`, about 25 months for "
    "billing); older rows are deleted by its retention task, per tenant in batches",
    minimum=1,
)
USAGE_FLUSH_RECORD_DAYS = integer(
    "USAGE_FLUSH_RECORD_DAYS",
    7,
    "days the feature gate keeps the flush ids of usage batches (`features.usage_flushes`, what makes a retried "
    "batch count once); a batch is retried only by the live process that made it, for seconds, never for days",
    minimum=1,
)
TENANT_TOMBSTONE_DAYS = integer(
    "TENANT_TOMBSTONE_DAYS",
    790,
    "days the registry keeps a deleted tenant's row (its tombstone: the id stays taken, and the usage report "
    "reads the plan from it) after its last change; longer than `USAGE_RETENTION_DAYS`, so a deleted tenant's "
    "usage is gone first. Then it is removed and the id may be created again",
    minimum=1,
)
RETENTION_PURGE_INTERVAL_SECONDS = seconds(
    "RETENTION_PURGE_INTERVAL_SECONDS",
    3600.0,
    "how often the feature gate deletes usage rows past `USAGE_RETENTION_DAYS` / `USAGE_FLUSH_RECORD_DAYS` and "
    "the registry tombstones past `TENANT_TOMBSTONE_DAYS` (`towerco_retention_purged_rows_total`); the first "
    "round one interval after the start",
)
USAGE_FLUSH_SECONDS = seconds(
    "USAGE_FLUSH_SECONDS",
    10.0,
    "how often each process hands the usage it counted (per tenant and hour) to the feature gate, and so the most "
    "usage a crash loses; a graceful stop flushes what is left",
)
_POOL_DOC = (
    "the one database pool per process: its size (the minimum is capped at the maximum), how long a call waits "
    "for a connection before UNAVAILABLE, and each statement's timeout"
)
DB_POOL_MAX_SIZE = integer("DB_POOL_MAX_SIZE", 20, _POOL_DOC, minimum=1)
DB_POOL_MIN_SIZE = integer("DB_POOL_MIN_SIZE", 2, _POOL_DOC)
DB_ACQUIRE_TIMEOUT_SECONDS = number("DB_ACQUIRE_TIMEOUT_SECONDS", 2.0, _POOL_DOC)
DB_STATEMENT_TIMEOUT_MS = integer("DB_STATEMENT_TIMEOUT_MS", 5000, _POOL_DOC)
DB_POOL_MODE = Setting(
    "DB_POOL_MODE",
    "session",
    "how `<SERVICE>_DATABASE_URL` and `<SERVICE>_READ_DATABASE_URL` reach PostgreSQL: `session` (directly, or a "
    "pooler in session mode) or `transaction` (pgbouncer's `pool_mode = transaction`: no prepared-statement cache, "
    "`application_name` the only start-up parameter, the timeouts set in each transaction like the tenant)",
    lambda name, raw: raw.lower(),
    "`session` or `transaction`",
    check=lambda value: value in ("session", "transaction"),
    refusal="DB_POOL_MODE must be session or transaction",
)
READ_DATABASE_URLS: dict[str, Setting[str]] = {
    name: text(
        f"{name.upper()}_READ_DATABASE_URL",
        "",
        "a streaming replica of the service's database, as its runtime role: it serves the read RPCs' reads (rate "
        "class read, not internal) unless the tenant's last write through the process is not replayed there yet; "
        "README: Read replicas",
        shown="none: the primary serves every read",
    )
    for name in DEFAULT_PORTS
}
MIGRATE_ON_START = flag(
    "MIGRATE_ON_START",
    False,
    "apply migrations at start-up with `MIGRATION_DATABASE_URL` (pods leave it `false`: the migration Job runs them)",
)
SHUTDOWN_DELAY_SECONDS = number(
    "SHUTDOWN_DELAY_SECONDS",
    1.0,
    "on SIGTERM: health NOT_SERVING this long (calls still served) before new calls are refused UNAVAILABLE "
    "`SHUTTING_DOWN` with RetryInfo: the call did not run, clients and the gateway retry it (never CANCELLED)",
)
SHUTDOWN_GRACE_SECONDS = number(
    "SHUTDOWN_GRACE_SECONDS", 10.0, "then in-flight calls get this long to finish; past it they are cancelled"
)
SERVICE_JWT_ISSUER = text(
    "SERVICE_JWT_ISSUER",
    DEFAULT_SERVICE_JWT_ISSUER,
    "issuer of service-to-service tokens; must differ from `JWT_ISSUER`",
)
_SERVICE_KEYS_DOC = "the service issuer's public keys, and this process's signing key and its key id"
SERVICE_JWKS_FILE = text("SERVICE_JWKS_FILE", "", _SERVICE_KEYS_DOC, shown="`$DATA_DIR/keys/service-jwks.json`")
SERVICE_KEY_FILE = text("SERVICE_KEY_FILE", "", _SERVICE_KEYS_DOC, shown="`$DATA_DIR/keys/service-signing-key.pem`")
SERVICE_KEY_ID = text("SERVICE_KEY_ID", DEV_SERVICE_KEY_ID, _SERVICE_KEYS_DOC)
TARGETS: dict[str, Setting[str]] = {
    name: text(
        f"{name.upper()}_TARGET",
        "",
        "where each service answers (service DNS names in a cluster): relays deliver audit events to "
        "`AUDIT_TARGET`, services ask `FEATURES_TARGET` for entitlements their caches lack. The gateway also "
        "takes several, comma-separated, balances over them and retries a call no host processed on another",
        shown="`127.0.0.1:<SERVICE>_PORT`",
    )
    for name in DEFAULT_PORTS
}
BASE_DOMAIN = text("BASE_DOMAIN", "localhost", "tenants' sub-domains: `<tenant>.<BASE_DOMAIN>`")
TENANT_CACHE_SECONDS = number(
    "TENANT_CACHE_SECONDS", 5.0, "longest a process trusts its memory of a tenant without hearing of a change"
)
REDIS_TIMEOUT_SECONDS = number(
    "REDIS_TIMEOUT_SECONDS", 0.05, "Redis calls on the request path give up after this; PostgreSQL answers instead"
)
REDIS_MAX_CONNECTIONS = integer(
    "REDIS_MAX_CONNECTIONS",
    16,
    "most connections each Redis client of a process opens (rate limiter, each cache; plus one per change "
    "subscription); a burst past them waits `REDIS_TIMEOUT_SECONDS` for one. Named "
    "`towerco-<service>/<pid>/<purpose>` in `CLIENT LIST`",
    minimum=1,
)
_ENCRYPTION_DOC = (
    "registry only: `kid=base64(32 bytes),...` AES-256-GCM keys of secret settings, and the active one; "
    "new values use the active key, old ones still open"
)
SETTINGS_ENCRYPTION_KEYS = text(
    "SETTINGS_ENCRYPTION_KEYS", "", _ENCRYPTION_DOC, shown="`$DATA_DIR/keys/settings-encryption.keys`"
)
SETTINGS_ENCRYPTION_KEY_ID = text("SETTINGS_ENCRYPTION_KEY_ID", "", _ENCRYPTION_DOC, shown="the first key")
PLANS_FILE = text(
    "PLANS_FILE",
    str(DEFAULT_PLANS_FILE),
    "the reviewed plans file every service reads at start-up (a broken file stops the process)",
    shown="`services/features/plans.toml`",
)
RATE_LIMIT_BURST_SECONDS = number(
    "RATE_LIMIT_BURST_SECONDS", 10.0, "a quiet tenant may send this many seconds' worth of its rate at once"
)
RATE_LIMIT_LOCAL_SHARE = number(
    "RATE_LIMIT_LOCAL_SHARE",
    0.25,
    "while Redis is unreachable, the share of a tenant's rate each process admits on its own",
    kind="number in (0, 1]",
    check=lambda share: 0 < share <= 1,
    refusal="RATE_LIMIT_LOCAL_SHARE must be a fraction in (0, 1]",
)
RATE_LIMIT_FAIL_CLOSED = flag(
    "RATE_LIMIT_FAIL_CLOSED",
    False,
    "instead refuse every rate-limited call while Redis is unreachable (UNAVAILABLE `RATE_LIMITER_UNAVAILABLE`)",
)
RATE_LIMIT_LEASE_SECONDS = number(
    "RATE_LIMIT_LEASE_SECONDS",
    0.02,
    "one Redis decision leases this many seconds of a tenant's rate (at most 100 calls) to the process, which "
    "spends them without asking again; a tenant may get up to one lease per process more than its rate over any "
    "window. Below `120 / this` calls a minute (6,000) a decision is one call; 0 turns leases off",
    kind="number >= 0",
    check=lambda lease: lease >= 0,
    refusal="RATE_LIMIT_LEASE_SECONDS must be 0 (no leases) or a positive number of seconds",
)
TENANT_CONCURRENCY_WAIT_SECONDS = number(
    "TENANT_CONCURRENCY_WAIT_SECONDS",
    0.25,
    "how long a call waits for one of its tenant's database slots before RESOURCE_EXHAUSTED `TENANT_CONCURRENCY_LIMIT`",
)
REFUSAL_HOLD_MAX_MS = integer(
    "REFUSAL_HOLD_MAX_MS",
    200,
    "a service's RESOURCE_EXHAUSTED refusal with a retry-after (`RATE_LIMITED`, `TENANT_CALLS_LIMIT`, "
    "`TENANT_CONCURRENCY_LIMIT`) is held this long at most before it is answered: a random time between its wait "
    "and twice it (between half this and this for a longer wait), so callers told the same slot come back spread "
    "out, never past the call's deadline; its RetryInfo then the wait that remains; 0 answers at once (README, "
    "*Held refusals*); the gateway holds its own (`GATEWAY_REFUSAL_HOLD_MAX_MS`)",
    minimum=0,
)
REFUSAL_HOLD_MAX_HELD = integer(
    "REFUSAL_HOLD_MAX_HELD",
    64,
    "most refusals a service process holds at once; past them a refusal is answered at once. Each held call's "
    "objects stay alive and the garbage collector's young collections walk them all: a few dozen pace a closed "
    "loop of callers, hundreds slow every call of the process (README, *Held refusals*)",
    minimum=0,
)
FAULT_POINTS = text(
    "FAULT_POINTS", "", "tests only: `point[:times],...` makes a named step fail (e.g. `provision.after_commit:1`)"
)
LOG_LEVEL = text("LOG_LEVEL", "INFO", "the services' log level: `DEBUG`, `INFO`, `WARNING` or `ERROR` (any case)")
LOG_FORMAT = Setting(
    "LOG_FORMAT",
    "text",
    "`text`: one readable line per record (`make run`); `json`: one JSON object per line (pods), with `tenant`, "
    "`request_id`, `trace_id`",
    lambda name, raw: raw.lower(),
    "`text` or `json`",
    check=lambda value: value in logs.FORMATS,
    refusal="LOG_FORMAT must be text or json",
)
OTEL_EXPORTER_OTLP_ENDPOINT = text(
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "",
    "where spans go, over OTLP gRPC (e.g. `http://otel-collector:4317`); unset: spans are not recorded, only their "
    "ids made (still in the logs and in `traceparent` between services), nothing is exported",
)
OTEL_BSP_SCHEDULE_DELAY = integer(
    "OTEL_BSP_SCHEDULE_DELAY",
    5000,
    "with an OTLP endpoint: most milliseconds a finished span waits to be sent",
    minimum=1,
)

SERVICE_SETTINGS = SettingsTable.of(
    "services",
    MIGRATION_DATABASE_URL,
    DATABASE_URLS.values(),
    REDIS_URL,
    PORTS.values(),
    GRPC_BIND_HOST,
    WORKERS.values(),
    METRICS_PORTS.values(),
    METRICS_TENANT_LABEL_CAP,
    PROMETHEUS_MULTIPROC_DIR,
    JWT_ISSUER,
    JWT_AUDIENCE,
    JWT_JWKS_FILE,
    JWT_JWKS_URL,
    JWT_LEEWAY_SECONDS,
    PAGE_TOKEN_SECRET,
    GATEWAY_SECRET,
    AUDIT_REFUSAL_WINDOW_SECONDS,
    CANARY_INTERVAL_SECONDS,
    AUDIT_RETENTION_INTERVAL_SECONDS,
    AUDIT_RETENTION_BATCH_SIZE,
    AUDIT_RETENTION_DATABASE_URL,
    AUDIT_RETENTION_CELL_DATABASE_URLS,
    TENANT_MOVER_DATABASE_URLS,
    IDEMPOTENCY_WINDOW_SECONDS,
    IDEMPOTENCY_PURGE_INTERVAL_SECONDS,
    USAGE_RETENTION_DAYS,
    USAGE_FLUSH_RECORD_DAYS,
    TENANT_TOMBSTONE_DAYS,
    RETENTION_PURGE_INTERVAL_SECONDS,
    USAGE_FLUSH_SECONDS,
    DB_POOL_MAX_SIZE,
    DB_POOL_MIN_SIZE,
    DB_ACQUIRE_TIMEOUT_SECONDS,
    DB_STATEMENT_TIMEOUT_MS,
    DB_POOL_MODE,
    READ_DATABASE_URLS.values(),
    CELLS,
    CELL_DATABASE_URLS.values(),
    MIGRATE_ON_START,
    SHUTDOWN_DELAY_SECONDS,
    SHUTDOWN_GRACE_SECONDS,
    SERVICE_JWT_ISSUER,
    SERVICE_JWKS_FILE,
    SERVICE_KEY_FILE,
    SERVICE_KEY_ID,
    TARGETS.values(),
    BASE_DOMAIN,
    TENANT_CACHE_SECONDS,
    REDIS_TIMEOUT_SECONDS,
    REDIS_MAX_CONNECTIONS,
    SETTINGS_ENCRYPTION_KEYS,
    SETTINGS_ENCRYPTION_KEY_ID,
    PLANS_FILE,
    RATE_LIMIT_BURST_SECONDS,
    RATE_LIMIT_LOCAL_SHARE,
    RATE_LIMIT_FAIL_CLOSED,
    RATE_LIMIT_LEASE_SECONDS,
    TENANT_CONCURRENCY_WAIT_SECONDS,
    REFUSAL_HOLD_MAX_MS,
    REFUSAL_HOLD_MAX_HELD,
    FAULT_POINTS,
    LOG_LEVEL,
    LOG_FORMAT,
    OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_BSP_SCHEDULE_DELAY,
    GRPC_TLS_SETTINGS,
    DATA_DIR,
)


@dataclass(frozen=True)
class Settings:
    """Everything a service process reads from its environment, once.

    A field holds the variable declared above under its name in capitals, whose declaration
    says what it means; except ``service`` (load's argument), ``bind_host``
    (``GRPC_BIND_HOST``), ``port`` (the service's ``<SERVICE>_PORT``), ``workers`` (its
    ``<SERVICE>_WORKERS``), ``metrics_port`` (its ``<SERVICE>_METRICS_PORT``), ``db_acquire_timeout``
    (``DB_ACQUIRE_TIMEOUT_SECONDS``), ``cell_database_urls`` (its ``<SERVICE>_CELL_DATABASE_URLS``)
    and the fields that say where they come from.
    """

    service: str
    bind_host: str
    port: int
    #: The service's ``<SERVICE>_WORKERS``.
    workers: int
    metrics_port: int
    metrics_tenant_label_cap: int
    prometheus_multiproc_dir: str
    #: Empty unless given (read only when migrating).
    migration_database_url: str = field(repr=False)
    #: The service's own ``<SERVICE>_DATABASE_URL``, as given.
    runtime_database_url: str = field(repr=False)
    redis_url: str
    db_pool_min_size: int
    db_pool_max_size: int
    db_acquire_timeout: float
    db_statement_timeout_ms: int
    db_pool_mode: str
    #: The service's ``<SERVICE>_READ_DATABASE_URL``; empty: no replica.
    read_database_url: str = field(repr=False)
    #: ``CELLS``: the home cell first.
    cells: tuple[Cell, ...]
    #: Every cell but the home one: its DSN as this service's runtime role (``<SERVICE>_CELL_DATABASE_URLS``).
    cell_database_urls: dict[str, str] = field(repr=False)
    migrate_on_start: bool
    jwt_issuer: str
    jwt_audience: str
    jwt_jwks_file: str
    jwt_jwks_url: str
    jwt_leeway_seconds: int
    service_jwt_issuer: str
    service_jwks_file: str
    service_key_file: str = field(repr=False)
    service_key_id: str
    #: Where each platform service answers (``<SERVICE>_TARGET``, else its ``<SERVICE>_PORT``
    #: on loopback), e.g. ``{"tenant": "127.0.0.1:50051", ...}``.
    targets: dict[str, str]
    base_domain: str
    tenant_cache_seconds: float
    redis_timeout_seconds: float
    redis_max_connections: int
    plans_file: str
    rate_limit_burst_seconds: float
    rate_limit_local_share: float
    rate_limit_fail_closed: bool
    rate_limit_lease_seconds: float
    tenant_concurrency_wait_seconds: float
    refusal_hold_max_ms: int
    refusal_hold_max_held: int
    audit_refusal_window_seconds: float
    audit_retention_interval_seconds: float
    audit_retention_batch_size: int
    audit_retention_database_url: str = field(repr=False)
    #: ``AUDIT_RETENTION_CELL_DATABASE_URLS``, by cell (the audit service's only).
    audit_retention_cell_database_urls: dict[str, str] = field(repr=False)
    #: ``TENANT_MOVER_DATABASE_URLS``, by cell, the home cell's too (the registry's only).
    tenant_mover_database_urls: dict[str, str] = field(repr=False)
    canary_interval_seconds: float
    idempotency_window_seconds: float
    idempotency_purge_interval_seconds: float
    usage_retention_days: int
    usage_flush_record_days: int
    tenant_tombstone_days: int
    retention_purge_interval_seconds: float
    usage_flush_seconds: float
    fault_points: str
    #: ``PAGE_TOKEN_SECRET``, else the dev file.
    page_token_secret: bytes = field(repr=False)
    #: ``GATEWAY_SECRET``, else the dev file, else empty (no call may name the client's address).
    gateway_secret: bytes = field(repr=False)
    shutdown_grace_seconds: float
    shutdown_delay_seconds: float
    log_level: str
    log_format: str
    otel_exporter_otlp_endpoint: str
    otel_bsp_schedule_delay: int
    grpc_tls_cert_file: str
    grpc_tls_key_file: str
    grpc_tls_ca_file: str

    @property
    def grpc_tls(self) -> GrpcTls:
        """TLS served, and used on calls to other services (services/runtime/tls.py)."""
        return GrpcTls(self.grpc_tls_cert_file, self.grpc_tls_key_file, self.grpc_tls_ca_file)


def data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where local state lives (embedded servers, dev keys): ``.data/`` unless ``DATA_DIR``."""
    env = process_environment() if environ is None else environ
    return Path(DATA_DIR.read(env) or Path.cwd() / ".data").resolve()


def runtime_role(service: str) -> str:
    """The role a service runs as, which its migrations create: ``<service>_app``."""
    return f"{service}_app"


def migration_target(settings: Settings) -> tuple[str, str | None]:
    """What migrating needs: the owner's DSN, and the runtime role's password (from its DSN; None: left as it is).

    SettingsError when ``MIGRATION_DATABASE_URL`` is missing, or the runtime DSN logs in as
    another role than the one the migrations create (its password would go to the wrong role).
    """
    if not settings.migration_database_url:
        raise SettingsError(
            f"MIGRATION_DATABASE_URL is not set: migrating needs the owner's DSN ({settings.service} "
            "migrate, or MIGRATE_ON_START=true)"
        )
    runtime = urlsplit(settings.runtime_database_url)
    role = runtime_role(settings.service)
    user = unquote(runtime.username or "")
    if user != role:
        raise SettingsError(
            f"{DATABASE_URLS[settings.service].name} logs in as {user or 'nobody'!r}, not {role!r}, the runtime "
            "role the migrations create"
        )
    return settings.migration_database_url, None if runtime.password is None else unquote(runtime.password)


def _page_token_secret(keys: Path, environ: Mapping[str, str]) -> bytes:
    raw = PAGE_TOKEN_SECRET.read(environ)
    if raw:
        return raw.encode()
    path = keys / "page-token.secret"
    if path.exists():
        return path.read_bytes().strip()
    raise SettingsError(
        f"PAGE_TOKEN_SECRET is not set and no dev secret exists at {path}; run `make keys` (dev) or set it (deploy)"
    )


def gateway_secret(keys: Path, environ: Mapping[str, str] | None = None) -> bytes:
    """``GATEWAY_SECRET``, else the dev secret ``make keys`` wrote, else empty (no call is the gateway's)."""
    raw = GATEWAY_SECRET.read(process_environment() if environ is None else environ)
    if raw:
        return raw.encode()
    path = keys / GATEWAY_SECRET_FILE
    return path.read_bytes().strip() if path.exists() else b""


def load(service: str, environ: Mapping[str, str] | None = None) -> Settings:
    """The settings of ``service`` from ``environ`` (the process environment by default); SettingsError if bad."""
    if service not in DEFAULT_PORTS:
        raise SettingsError(f"unknown service {service!r}")
    env = process_environment() if environ is None else environ
    keys = data_dir(env) / "keys"
    runtime_url = DATABASE_URLS[service].read(env)
    if not runtime_url:
        raise SettingsError(
            f"{DATABASE_URLS[service].name} is not set: the DSN of the {service} service's runtime role "
            f"{runtime_role(service)} (DATABASE_URL and APP_DB_PASSWORD are no longer read)"
        )
    jwks_url = JWT_JWKS_URL.read(env)
    jwks_file = JWT_JWKS_FILE.read(env) or ("" if jwks_url else str(keys / "jwks.json"))
    ports = {name: setting.read(env) for name, setting in PORTS.items()}
    pool_max = DB_POOL_MAX_SIZE.read(env)
    tls = GrpcTls.from_env(env)
    settings = Settings(
        service=service,
        bind_host=GRPC_BIND_HOST.read(env),
        port=ports[service],
        workers=WORKERS[service].read(env),
        metrics_port=METRICS_PORTS[service].read(env),
        metrics_tenant_label_cap=METRICS_TENANT_LABEL_CAP.read(env),
        prometheus_multiproc_dir=PROMETHEUS_MULTIPROC_DIR.read(env),
        migration_database_url=MIGRATION_DATABASE_URL.read(env),
        runtime_database_url=runtime_url,
        redis_url=REDIS_URL.read(env),
        db_pool_min_size=min(DB_POOL_MIN_SIZE.read(env), pool_max),
        db_pool_max_size=pool_max,
        db_acquire_timeout=DB_ACQUIRE_TIMEOUT_SECONDS.read(env),
        db_statement_timeout_ms=DB_STATEMENT_TIMEOUT_MS.read(env),
        db_pool_mode=DB_POOL_MODE.read(env),
        read_database_url=READ_DATABASE_URLS[service].read(env),
        cells=CELLS.read(env),
        cell_database_urls=_cell_database_urls(service, env),
        migrate_on_start=MIGRATE_ON_START.read(env),
        jwt_issuer=JWT_ISSUER.read(env),
        jwt_audience=JWT_AUDIENCE.read(env),
        jwt_jwks_file=jwks_file,
        jwt_jwks_url=jwks_url,
        jwt_leeway_seconds=JWT_LEEWAY_SECONDS.read(env),
        service_jwt_issuer=SERVICE_JWT_ISSUER.read(env),
        service_jwks_file=SERVICE_JWKS_FILE.read(env) or str(keys / "service-jwks.json"),
        service_key_file=SERVICE_KEY_FILE.read(env) or str(keys / "service-signing-key.pem"),
        service_key_id=SERVICE_KEY_ID.read(env),
        targets=service_targets(env),
        base_domain=BASE_DOMAIN.read(env).lower().strip("."),
        tenant_cache_seconds=TENANT_CACHE_SECONDS.read(env),
        redis_timeout_seconds=REDIS_TIMEOUT_SECONDS.read(env),
        redis_max_connections=REDIS_MAX_CONNECTIONS.read(env),
        plans_file=PLANS_FILE.read(env),
        rate_limit_burst_seconds=RATE_LIMIT_BURST_SECONDS.read(env),
        rate_limit_local_share=RATE_LIMIT_LOCAL_SHARE.read(env),
        rate_limit_fail_closed=RATE_LIMIT_FAIL_CLOSED.read(env),
        rate_limit_lease_seconds=RATE_LIMIT_LEASE_SECONDS.read(env),
        tenant_concurrency_wait_seconds=TENANT_CONCURRENCY_WAIT_SECONDS.read(env),
        refusal_hold_max_ms=REFUSAL_HOLD_MAX_MS.read(env),
        refusal_hold_max_held=REFUSAL_HOLD_MAX_HELD.read(env),
        audit_refusal_window_seconds=AUDIT_REFUSAL_WINDOW_SECONDS.read(env),
        canary_interval_seconds=CANARY_INTERVAL_SECONDS.read(env),
        audit_retention_interval_seconds=AUDIT_RETENTION_INTERVAL_SECONDS.read(env),
        audit_retention_batch_size=AUDIT_RETENTION_BATCH_SIZE.read(env),
        audit_retention_database_url=AUDIT_RETENTION_DATABASE_URL.read(env),
        audit_retention_cell_database_urls=_audit_retention_cell_urls(service, env),
        tenant_mover_database_urls=_tenant_mover_urls(service, env),
        idempotency_window_seconds=IDEMPOTENCY_WINDOW_SECONDS.read(env),
        idempotency_purge_interval_seconds=IDEMPOTENCY_PURGE_INTERVAL_SECONDS.read(env),
        usage_retention_days=USAGE_RETENTION_DAYS.read(env),
        usage_flush_record_days=USAGE_FLUSH_RECORD_DAYS.read(env),
        tenant_tombstone_days=TENANT_TOMBSTONE_DAYS.read(env),
        retention_purge_interval_seconds=RETENTION_PURGE_INTERVAL_SECONDS.read(env),
        usage_flush_seconds=USAGE_FLUSH_SECONDS.read(env),
        fault_points=FAULT_POINTS.read(env),
        page_token_secret=_page_token_secret(keys, env),
        gateway_secret=gateway_secret(keys, env),
        shutdown_grace_seconds=SHUTDOWN_GRACE_SECONDS.read(env),
        shutdown_delay_seconds=SHUTDOWN_DELAY_SECONDS.read(env),
        log_level=LOG_LEVEL.read(env).upper(),
        log_format=LOG_FORMAT.read(env),
        otel_exporter_otlp_endpoint=OTEL_EXPORTER_OTLP_ENDPOINT.read(env),
        otel_bsp_schedule_delay=OTEL_BSP_SCHEDULE_DELAY.read(env),
        grpc_tls_cert_file=tls.cert_file,
        grpc_tls_key_file=tls.key_file,
        grpc_tls_ca_file=tls.ca_file,
    )
    if not (settings.jwt_jwks_file or settings.jwt_jwks_url):
        raise SettingsError("set JWT_JWKS_FILE or JWT_JWKS_URL")
    if settings.service_jwt_issuer == settings.jwt_issuer:
        raise SettingsError("SERVICE_JWT_ISSUER must differ from JWT_ISSUER: users must never pass for services")
    for path, what in (
        (settings.service_jwks_file, "SERVICE_JWKS_FILE"),
        (settings.service_key_file, "SERVICE_KEY_FILE"),
    ):
        if not Path(path).exists():
            raise SettingsError(
                f"{what} {path} does not exist; run `make keys` (dev) or mount the service keys (deploy)"
            )
    return settings


def _cell_database_urls(service: str, env: Mapping[str, str]) -> dict[str, str]:
    """The service's DSN of each cell but the home one; the registry keeps no tenant rows in other cells."""
    setting = CELL_DATABASE_URLS.get(service)
    if setting is None:
        return {}
    dsns = dict(setting.read(env))
    check_cell_dsns(CELLS.read(env), dsns, setting.name)
    return dsns


def _tenant_mover_urls(service: str, env: Mapping[str, str]) -> dict[str, str]:
    """The mover's DSN of every cell, the home one's too (the registry's only; none: no moves)."""
    dsns = dict(TENANT_MOVER_DATABASE_URLS.read(env))
    if service != "tenant" or not dsns:
        return {}
    names = [c.name for c in CELLS.read(env)]
    if sorted(dsns) != sorted(names):
        raise SettingsError(
            f"{TENANT_MOVER_DATABASE_URLS.name} must name every cell of CELLS ({', '.join(names)}), "
            f"the home cell's too; it names {', '.join(sorted(dsns))}"
        )
    return dsns


def _audit_retention_cell_urls(service: str, env: Mapping[str, str]) -> dict[str, str]:
    """The retention job's DSN of each cell but the home one: one for every cell when it runs at all."""
    if service != "audit" or not AUDIT_RETENTION_DATABASE_URL.read(env):
        return {}
    dsns = dict(AUDIT_RETENTION_CELL_DATABASE_URLS.read(env))
    check_cell_dsns(CELLS.read(env), dsns, AUDIT_RETENTION_CELL_DATABASE_URLS.name)
    return dsns


def service_targets(environ: Mapping[str, str]) -> dict[str, str]:
    """``host:port`` of every service: its ``<SERVICE>_TARGET``, else its port on loopback."""
    return {name: TARGETS[name].read(environ) or f"127.0.0.1:{PORTS[name].read(environ)}" for name in DEFAULT_PORTS}
