"""Process settings, read once from the environment at start-up."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

from .plans import DEFAULT_PLANS_FILE

#: Default ports of the four services (each overridable by ``<NAME>_PORT``).
DEFAULT_PORTS: dict[str, int] = {"tenant": 50051, "sites": 50052, "features": 50053, "audit": 50054}


#: Password of the runtime roles when APP_DB_PASSWORD is not set (trust auth in dev ignores it).
DEV_APP_DB_PASSWORD = "towerco-dev-only"  # noqa: S105 - documented dev default; deployments set it
DEFAULT_JWT_ISSUER = "towerco-dev-issuer"
DEFAULT_JWT_AUDIENCE = "towerco-aiops"
#: Issuer of the tokens the platform's services present to each other (never users).
DEFAULT_SERVICE_JWT_ISSUER = "towerco-services"
DEV_SERVICE_KEY_ID = "towerco-service-dev-1"
#: The dev gateway secret's file under the keys folder (``GATEWAY_SECRET`` in a deployment).
GATEWAY_SECRET_FILE = "gateway.secret"  # noqa: S105 - a file name, not a secret


def env_str(name: str, default: str, environ: Mapping[str, str] | None = None) -> str:
    """``name`` from ``environ`` (the process environment by default), stripped; ``default`` if empty."""
    value = (os.environ if environ is None else environ).get(name, "").strip()
    return value or default


def env_int(name: str, default: int, environ: Mapping[str, str] | None = None) -> int:
    return _env_number(name, default, int, environ)


def _env(name: str, default: str) -> str:
    return env_str(name, default)


def _env_number(name: str, default: N, parse: Callable[[str], N], environ: Mapping[str, str] | None = None) -> N:
    raw = env_str(name, "", environ)
    if not raw:
        return default
    try:
        return parse(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from exc


def _env_int(name: str, default: int) -> int:
    return env_int(name, default)


def _env_float(name: str, default: float) -> float:
    return _env_number(name, default, float)


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


N = TypeVar("N", int, float)


class SettingsError(ValueError):
    """A setting is missing or malformed; the process refuses to start."""


@dataclass(frozen=True)
class Settings:
    """Everything a service process reads from its environment, once."""

    service: str
    #: Address the gRPC server binds, e.g. ``127.0.0.1`` in dev, ``0.0.0.0`` in a pod.
    bind_host: str
    port: int
    #: Administrative DSN: creates roles and schemas and runs migrations as the owner role.
    database_url: str
    #: DSN of this service's runtime role (never an owner, superuser or BYPASSRLS).
    runtime_database_url: str = field(repr=False)
    #: Password the migrations give the runtime role (trust auth in dev ignores it).
    app_db_password: str = field(repr=False)
    redis_url: str
    db_pool_min_size: int
    db_pool_max_size: int
    #: Seconds a request waits for a pooled connection before UNAVAILABLE.
    db_acquire_timeout: float
    db_statement_timeout_ms: int
    migrate_on_start: bool
    jwt_issuer: str
    jwt_audience: str
    jwt_jwks_file: str
    jwt_jwks_url: str
    jwt_leeway_seconds: int
    #: The platform's service issuer: its public keys, and this process's signing key.
    service_jwt_issuer: str
    service_jwks_file: str
    service_key_file: str = field(repr=False)
    service_key_id: str
    #: Where each platform service answers, e.g. ``{"tenant": "127.0.0.1:50051", ...}``.
    targets: dict[str, str]
    #: Tenants' sub-domains hang off this domain: ``<tenant>.<base_domain>``.
    base_domain: str
    #: Seconds a process trusts its in-memory copy of a tenant's state and settings
    #: without hearing of a change (changes are pushed at once through Redis).
    tenant_cache_seconds: float
    #: Redis calls on the request path give up after this long (then PostgreSQL answers).
    redis_timeout_seconds: float
    #: The most connections each Redis client of the process opens (the rate limiter's and
    #: each cache's); a burst past them waits up to ``redis_timeout_seconds`` for one.
    redis_max_connections: int
    #: The reviewed plans file (features and limits of each plan).
    plans_file: str
    #: A quiet tenant may send this many seconds' worth of its rate at once.
    rate_limit_burst_seconds: float
    #: While Redis is unreachable, the share of a tenant's rate one process admits alone...
    rate_limit_local_share: float
    #: ...or, when set, nothing at all (UNAVAILABLE, reason RATE_LIMITER_UNAVAILABLE).
    rate_limit_fail_closed: bool
    #: How long a transaction waits for one of its tenant's connection slots before
    #: RESOURCE_EXHAUSTED, reason TENANT_CONCURRENCY_LIMIT.
    tenant_concurrency_wait_seconds: float
    #: Refused cross-tenant attempts are tallied and audited once per caller, target and
    #: method per this many seconds, with their count.
    audit_refusal_window_seconds: float
    #: Test-only fault injection: ``point[:times],...`` (see services.runtime.faults).
    fault_points: str
    #: Secret that signs page tokens so a tampered or foreign token is refused.
    page_token_secret: bytes = field(repr=False)
    #: The secret the gateway presents on every call it forwards (``GATEWAY_SECRET``):
    #: only such a call may name the client's address in ``x-forwarded-for``. Empty: none may.
    gateway_secret: bytes = field(repr=False)
    shutdown_grace_seconds: float
    #: Seconds between NOT_SERVING and refusing new calls, for load balancers to notice.
    shutdown_delay_seconds: float
    log_level: str


def data_dir() -> Path:
    """Where local state lives (embedded servers, dev keys): ``.data/`` unless ``DATA_DIR``."""
    return Path(_env("DATA_DIR", str(Path.cwd() / ".data"))).resolve()


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
    """The runtime role's DSN: the admin DSN's host and database with ``<service>_app``."""
    return dsn_with_user(admin_dsn, f"{service}_app", password)


def _page_token_secret(keys: Path) -> bytes:
    raw = os.environ.get("PAGE_TOKEN_SECRET", "").strip()
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
    raw = env_str("GATEWAY_SECRET", "", environ)
    if raw:
        return raw.encode()
    path = keys / GATEWAY_SECRET_FILE
    return path.read_bytes().strip() if path.exists() else b""


def load(service: str) -> Settings:
    """Read the settings of ``service`` from the environment; raise SettingsError if bad."""
    if service not in DEFAULT_PORTS:
        raise SettingsError(f"unknown service {service!r}")
    keys = data_dir() / "keys"
    database_url = _env("DATABASE_URL", "")
    if not database_url:
        raise SettingsError("DATABASE_URL is not set (make run sets it for the embedded server)")
    password = _env("APP_DB_PASSWORD", DEV_APP_DB_PASSWORD)
    runtime_url = _env(f"{service.upper()}_DATABASE_URL", runtime_dsn(database_url, service, password))
    jwks_file = _env("JWT_JWKS_FILE", "" if os.environ.get("JWT_JWKS_URL") else str(keys / "jwks.json"))
    pool_max = _env_int("DB_POOL_MAX_SIZE", 20)
    settings = Settings(
        service=service,
        bind_host=_env("GRPC_BIND_HOST", "127.0.0.1"),
        port=_env_int(f"{service.upper()}_PORT", DEFAULT_PORTS[service]),
        database_url=database_url,
        runtime_database_url=runtime_url,
        app_db_password=password,
        redis_url=_env("REDIS_URL", "redis://127.0.0.1:56379/0"),
        db_pool_min_size=min(_env_int("DB_POOL_MIN_SIZE", 2), pool_max),
        db_pool_max_size=pool_max,
        db_acquire_timeout=_env_float("DB_ACQUIRE_TIMEOUT_SECONDS", 2.0),
        db_statement_timeout_ms=_env_int("DB_STATEMENT_TIMEOUT_MS", 5000),
        migrate_on_start=_env_bool("MIGRATE_ON_START", True),
        jwt_issuer=_env("JWT_ISSUER", DEFAULT_JWT_ISSUER),
        jwt_audience=_env("JWT_AUDIENCE", DEFAULT_JWT_AUDIENCE),
        jwt_jwks_file=jwks_file,
        jwt_jwks_url=_env("JWT_JWKS_URL", ""),
        jwt_leeway_seconds=_env_int("JWT_LEEWAY_SECONDS", 30),
        service_jwt_issuer=_env("SERVICE_JWT_ISSUER", DEFAULT_SERVICE_JWT_ISSUER),
        service_jwks_file=_env("SERVICE_JWKS_FILE", str(keys / "service-jwks.json")),
        service_key_file=_env("SERVICE_KEY_FILE", str(keys / "service-signing-key.pem")),
        service_key_id=_env("SERVICE_KEY_ID", DEV_SERVICE_KEY_ID),
        targets={
            name: _env(f"{name.upper()}_TARGET", f"127.0.0.1:{_env_int(f'{name.upper()}_PORT', port)}")
            for name, port in DEFAULT_PORTS.items()
        },
        base_domain=_env("BASE_DOMAIN", "localhost").lower().strip("."),
        tenant_cache_seconds=_env_float("TENANT_CACHE_SECONDS", 5.0),
        redis_timeout_seconds=_env_float("REDIS_TIMEOUT_SECONDS", 0.05),
        redis_max_connections=_env_int("REDIS_MAX_CONNECTIONS", 16),
        plans_file=_env("PLANS_FILE", str(DEFAULT_PLANS_FILE)),
        rate_limit_burst_seconds=_env_float("RATE_LIMIT_BURST_SECONDS", 10.0),
        rate_limit_local_share=_env_float("RATE_LIMIT_LOCAL_SHARE", 0.25),
        rate_limit_fail_closed=_env_bool("RATE_LIMIT_FAIL_CLOSED", False),
        tenant_concurrency_wait_seconds=_env_float("TENANT_CONCURRENCY_WAIT_SECONDS", 0.25),
        audit_refusal_window_seconds=_env_float("AUDIT_REFUSAL_WINDOW_SECONDS", 60.0),
        fault_points=_env("FAULT_POINTS", ""),
        page_token_secret=_page_token_secret(keys),
        gateway_secret=gateway_secret(keys),
        shutdown_grace_seconds=_env_float("SHUTDOWN_GRACE_SECONDS", 10.0),
        shutdown_delay_seconds=_env_float("SHUTDOWN_DELAY_SECONDS", 1.0),
        log_level=_env("LOG_LEVEL", "INFO").upper(),
    )
    if not 0 < settings.rate_limit_local_share <= 1:
        raise SettingsError("RATE_LIMIT_LOCAL_SHARE must be a fraction in (0, 1]")
    if settings.audit_refusal_window_seconds <= 0:
        raise SettingsError("AUDIT_REFUSAL_WINDOW_SECONDS must be a positive number of seconds")
    if settings.db_pool_max_size < 1:
        raise SettingsError("DB_POOL_MAX_SIZE must be at least 1")
    if settings.redis_max_connections < 1:
        raise SettingsError("REDIS_MAX_CONNECTIONS must be at least 1")
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
