"""Start-up and shutdown shared by every service process.

``serve(spec)`` does, in order: read settings, apply migrations, open the one pool, run
the isolation guard, build the interceptor chain from the declared policies, register
the servicer, health and reflection, and serve until SIGTERM/SIGINT. Shutdown marks
health NOT_SERVING, refuses new calls UNAVAILABLE (interceptors/shutdown.py), drains
in-flight calls within the grace period, stops the server, then closes the pool.

With ``<SERVICE>_WORKERS`` above 1, ``main`` checks the ports and migrates once, then runs
several such processes on the one port (services/runtime/workers.py).
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from google.protobuf.descriptor import ServiceDescriptor
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from . import cells, channels, logs, metrics, migrations, tracing, usage
from .audit import Auditor, AuditRelay
from .auth import TenantIssuers, TokenVerifier, VerifierConfig
from .canary import CanaryError, IsolationCanary
from .cell_guard import LateCellGuard
from .db import UNREACHABLE, Database, connect_options
from .entitlements import CHANNEL as ENTITLEMENTS_CHANNEL
from .entitlements import EntitlementDirectory, FeatureGateSource, RecordSource
from .faults import Faults
from .guard import IsolationError, check_isolation
from .health import DatabaseProbe, HealthState, probe_name
from .identity import ServiceIdentity
from .interceptors.base import Chain
from .interceptors.chain import server_chain
from .interceptors.shutdown import ShutdownGate
from .lookups import InternalLookup
from .metrics_endpoint import MetricsEndpoint, start_metrics_endpoint
from .pagination import PageTokens
from .plans import Plans, PlansError, load_plans
from .policy import PolicyError, PolicyTable
from .ratelimit import LimiterConfig, RateLimiter
from .redis_clients import RedisConfig
from .refusal_audit import RefusalAudit
from .refusal_hold import RefusalHold
from .settings import Settings, SettingsError, load, migration_target
from .sso_issuers import RegistrySsoSource, SsoIssuers
from .tenant_cache import CHANNEL as TENANT_CHANNEL
from .tenant_cache import TenantCache
from .tenants import RegistryStateSource, StateSource, TenantDirectory
from .user_access import RegistryUserSource, UserSource
from .workers import WorkerRole, run_workers

log = logging.getLogger("towerco.server")


class ListenError(Exception):
    """The gRPC port cannot be listened on (another process holds it, or the host is not local)."""


#: Conditions under which a process must not serve; reported in one line, exit code 2.
STARTUP_ERRORS: tuple[type[Exception], ...] = (
    SettingsError,
    PolicyError,
    PlansError,
    IsolationError,
    CanaryError,
    ListenError,
    migrations.MigrationError,
    asyncpg.PostgresError,
    OSError,
)


Hook = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Runtime:
    """What a servicer gets from the platform, made once per process."""

    settings: Settings
    db: Database
    page_tokens: PageTokens
    #: This service's own identity, for internal calls to other services.
    identity: ServiceIdentity
    #: Tenant state and settings, cached in memory and Redis.
    cache: TenantCache
    tenants: TenantDirectory
    faults: Faults
    #: Records audit events into this service's outbox, in the change's transaction.
    audit: Auditor
    #: The plans file, and each tenant's entitlements (plan and overrides), in memory.
    plans: Plans
    entitlements: EntitlementDirectory
    _starters: list[Hook] = field(default_factory=list, repr=False)
    _stoppers: list[Hook] = field(default_factory=list, repr=False)

    def on_start(self, *hooks: Hook) -> None:
        """Run ``hooks`` once the server is serving (e.g. resume unfinished background work)."""
        self._starters.extend(hooks)

    def on_stop(self, *hooks: Hook) -> None:
        """Run ``hooks`` after the server has drained, before the pool closes."""
        self._stoppers.extend(hooks)


@dataclass(frozen=True)
class ServiceSpec:
    """What is particular to one service; everything else is shared."""

    #: Short name: ``sites``; picks ``SITES_PORT``, the roles ``sites_owner``/``sites_app``.
    name: str
    #: The PostgreSQL schema the service owns.
    schema: str
    #: The gRPC services it serves (their descriptors carry the access policies).
    services: tuple[ServiceDescriptor, ...]
    #: Folder of its versioned SQL migrations.
    migrations_dir: Path
    #: Registers the servicer(s) on the server.
    register: Callable[[aio.Server, Runtime], None]
    #: Where this service reads tenant state on a cache miss; default: ask the registry.
    state_source: Callable[[Database], StateSource] | None = None
    #: Where it reads a registry user's state and role on a cache miss; default: ask the registry.
    user_source: Callable[[Database], UserSource] | None = None
    #: Where it reads entitlement records on a cache miss; default: ask the feature gate.
    entitlement_source: Callable[[Database], RecordSource] | None = None
    #: Whether the service has an ``audit_outbox`` table and relays it to the audit service.
    outbox: bool = True
    #: Other shared SQL components to apply into its schema (``services/runtime/sql/<name>``),
    #: e.g. ``tenant_data`` for the bookkeeping of TenantDataService.
    components: tuple[str, ...] = ()
    #: Set-up the SQL migrations cannot do as the owner role (e.g. extra roles), run with
    #: the administrative DSN after every migration run, however it is started. Idempotent.
    after_migrate: Callable[[str], Awaitable[None]] | None = None
    #: The isolation canary's sentinel rows (``services/runtime/canary.py``): for each tenant
    #: table of the schema, the INSERT of one canary's row (``$1``: the canary tenant id,
    #: ``{schema}``: the schema; ON CONFLICT DO NOTHING), in the order they may be written.
    sentinels: Mapping[str, str] = field(default_factory=dict)
    #: Where the process's usage counts go (``services/runtime/usage.py``); default: the
    #: feature gate's ``RecordUsage``. The feature gate records its own directly.
    usage_sink: Callable[[Runtime], usage.Sink] | None = None


async def run_migrations(spec: ServiceSpec, settings: Settings) -> list[int]:
    """Migrate with ``MIGRATION_DATABASE_URL``, giving the runtime role the password of its own DSN."""
    admin_dsn, app_password = migration_target(settings)
    return await migrate_service(spec, admin_dsn, app_password)


async def migrate_service(spec: ServiceSpec, admin_dsn: str, app_password: str | None) -> list[int]:
    """Apply the service's pending migrations, then its ``after_migrate`` set-up.

    ``app_password``: the runtime role's password; None leaves it as it is.
    """
    components = (*(("audit_outbox",) if spec.outbox else ()), *spec.components)
    applied = await migrations.migrate(admin_dsn, spec.name, spec.schema, spec.migrations_dir, app_password, components)
    if spec.after_migrate is not None:
        await spec.after_migrate(admin_dsn)
    return applied


def make_verifier(settings: Settings, tenant_issuers: TenantIssuers | None = None) -> TokenVerifier:
    return TokenVerifier(
        VerifierConfig(
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            leeway_seconds=settings.jwt_leeway_seconds,
            jwks_file=settings.jwt_jwks_file,
            jwks_url=settings.jwt_jwks_url,
        ),
        service=VerifierConfig(
            issuer=settings.service_jwt_issuer,
            audience=settings.jwt_audience,
            leeway_seconds=settings.jwt_leeway_seconds,
            jwks_file=settings.service_jwks_file,
        ),
        tenant_issuers=tenant_issuers,
    )


def tenant_issuers(runtime: Runtime) -> SsoIssuers:
    """The tenants' own issuers (single sign-on), asked of the registry and kept current by its notices."""
    settings = runtime.settings
    registry = RegistrySsoSource(settings.targets["tenant"], runtime.identity)
    runtime.on_stop(registry.close)
    platform = frozenset({settings.jwt_issuer, settings.service_jwt_issuer})
    return SsoIssuers(
        platform, runtime.cache, registry.by_issuer, registry.of_tenant, registry.sign_in, runtime.entitlements
    )


def build_server(
    spec: ServiceSpec,
    runtime: Runtime,
    policies: PolicyTable,
    limiter: RateLimiter,
    refusals: RefusalAudit,
    *,
    reuse_port: bool = False,
) -> tuple[aio.Server, HealthServicer, ShutdownGate]:
    """The gRPC server; ``reuse_port``: a worker's, sharing the port with its siblings (SO_REUSEPORT)."""
    settings = runtime.settings
    gate = ShutdownGate(policies)
    verifier = make_verifier(settings, tenant_issuers(runtime))
    hold = RefusalHold(settings.refusal_hold_max_ms / 1000, settings.refusal_hold_max_held)
    chain = server_chain(
        policies, verifier, runtime.tenants, runtime.entitlements, limiter, refusals, gate,
        gateway_secret=settings.gateway_secret, hold=hold,
    )  # fmt: skip
    server = aio.server(
        # No interceptor: each servicer method is registered inside the links, once (Chain).
        options=[
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ("grpc.so_reuseport", int(reuse_port)),
            # Room for an oversized token to reach the authentication link and be refused
            # there as UNAUTHENTICATED, rather than by the transport at random.
            ("grpc.max_metadata_size", 32 * 1024),
            ("grpc.absolute_max_metadata_size", 32 * 1024),
        ],
    )
    spec.register(Chain(chain).registering(server), runtime)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = [s.full_name for s in spec.services]
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    address = f"{settings.bind_host}:{settings.port}"
    credentials = settings.grpc_tls.server_credentials()
    try:
        if credentials is None:
            server.add_insecure_port(address)
        else:  # TLS only: a plaintext client fails its handshake
            server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # taken since the check at start-up: gRPC says only "Failed to bind"
        raise ListenError(f"cannot listen on {settings.bind_host}:{settings.port} ({exc})") from None
    return server, health, gate


def check_port_free(host: str, port: int, variable: str) -> None:
    """Refuse to start, in one line, when another process already listens on ``host:port``.

    Checked before migrations and connections, so a second copy of a service started by
    mistake touches nothing. gRPC binds with SO_REUSEADDR and without SO_REUSEPORT; so
    does the probe, so a port in TIME_WAIT is free here as it is there.
    """
    for family, kind, proto, _, address in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    continue  # e.g. no IPv6 for "localhost": gRPC binds what it can, as before
                raise ListenError(
                    f"port {port} on {host} is already in use by another process; stop it or set {variable}"
                ) from None


async def _guard_isolation(spec: ServiceSpec, settings: Settings) -> str:
    """The isolation guard, as the runtime role, on the primary and on the replica if there is one.

    Returns the read DSN to use: none when there is no replica, or when it cannot be reached
    to be checked (then the primary serves every read until the process restarts, rather
    than a replica nobody checked, or no start at all while the replica is away).
    """
    await _check_isolation_at(settings.runtime_database_url, spec, settings)
    if not settings.read_database_url:
        return ""
    try:
        await _check_isolation_at(settings.read_database_url, spec, settings)
    except UNREACHABLE as exc:
        log.warning(
            "read replica unreachable at start-up (%s: %s): the primary serves every read until a restart",
            type(exc).__name__,
            exc,
        )
        return ""
    return settings.read_database_url


async def _guard_cells(spec: ServiceSpec, settings: Settings) -> dict[str, str]:
    """The isolation guard on every other cell; those unreachable now (name -> DSN), not waited for.

    Their tenants' calls are UNAVAILABLE until they answer and pass it (LateCellGuard); the
    other cells' tenants are served meanwhile.
    """
    unguarded = {}
    for cell, dsn in settings.cell_database_urls.items():
        try:
            await _check_isolation_at(dsn, spec, settings)
        except UNREACHABLE as exc:
            log.warning(
                "cell %s unreachable at start-up (%s): its tenants' calls are UNAVAILABLE until it answers and "
                "passes the isolation guard",
                cell,
                type(exc).__name__,
            )
            unguarded[cell] = dsn
    return unguarded


async def _check_isolation_at(dsn: str, spec: ServiceSpec, settings: Settings) -> None:
    options = connect_options(settings.db_pool_mode, settings.db_statement_timeout_ms, f"towerco-{spec.name}-guard")
    try:
        conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn, **options)
    except asyncpg.PostgresError as exc:
        if "unsupported startup parameter" not in str(exc):
            raise
        raise SettingsError(f"{exc}: a pooler in transaction mode (pgbouncer)? set DB_POOL_MODE=transaction") from None
    try:
        async with conn.transaction(readonly=True):  # a transaction pooler keeps it on one server session
            await check_isolation(conn, spec.schema)
    finally:
        await conn.close()


def check_ports(spec: ServiceSpec, settings: Settings) -> None:
    """ListenError unless the service's gRPC and metrics ports are free (see :func:`check_port_free`)."""
    check_port_free(settings.bind_host, settings.port, f"{spec.name.upper()}_PORT")
    if settings.metrics_port:
        check_port_free(settings.bind_host, settings.metrics_port, f"{spec.name.upper()}_METRICS_PORT")


async def migrate_on_start(spec: ServiceSpec, settings: Settings) -> None:
    """``MIGRATE_ON_START``: apply the pending migrations (once per service, not per worker)."""
    if settings.migrate_on_start:
        applied = await run_migrations(spec, settings)
        if applied:
            log.info("migrations applied: %s", applied)


async def serve(spec: ServiceSpec, role: WorkerRole | None = None) -> None:
    """Serve until SIGTERM/SIGINT; ``role``: as one of several workers, whose parent checked and migrated."""
    settings = load(spec.name)
    logs.configure(spec.name, settings.log_level, settings.log_format, None if role is None else role.index)
    tracing.configure(spec.name, settings.otel_exporter_otlp_endpoint, settings.otel_bsp_schedule_delay)
    if role is None:
        check_ports(spec, settings)
    metrics.configure(spec.name, settings.metrics_tenant_label_cap)
    channels.configure(settings.grpc_tls)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if role is not None:
        role.watch_parent(loop, stop)

    policies = PolicyTable.from_services(spec.services)  # static: fail before touching anything
    if not settings.gateway_secret:
        log.warning("GATEWAY_SECRET is not set: the audit log records the gateway's address, not its clients'")
    plans = load_plans(settings.plans_file)
    if role is None:
        await migrate_on_start(spec, settings)
    read_dsn = await _guard_isolation(spec, settings)
    unguarded = await _guard_cells(spec, settings)
    db = await Database.connect(
        settings.runtime_database_url,
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
        acquire_timeout=settings.db_acquire_timeout,
        statement_timeout_ms=settings.db_statement_timeout_ms,
        application_name=f"towerco-{spec.name}/{os.getpid()}",
        tenant_wait_seconds=settings.tenant_concurrency_wait_seconds,
        pool_mode=settings.db_pool_mode,
        read_dsn=read_dsn,
        home_cell=settings.cells[0].name,
        cell_dsns=settings.cell_database_urls,
        write_barrier=spec.name in cells.CELL_SERVICES,  # services/tenant/tenant_move.py
    )
    db.route_reads(p.method for p in policies if not p.write and not p.internal)
    identity = ServiceIdentity.from_file(
        spec.name,
        issuer=settings.service_jwt_issuer,
        audience=settings.jwt_audience,
        key_file=settings.service_key_file,
        kid=settings.service_key_id,
    )
    cache = _tenant_cache(settings)
    # A service reads what it owns from its database, and asks the owner for the rest.
    remote: list[InternalLookup] = []
    source = (
        spec.state_source(db) if spec.state_source else _ask(RegistryStateSource, "tenant", settings, identity, remote)
    )
    record_source = (
        spec.entitlement_source(db)
        if spec.entitlement_source
        else _ask(FeatureGateSource, "features", settings, identity, remote)
    )
    # A cache of its own: the feature gate counts versions apart from the registry.
    entitlement_cache = _tenant_cache(settings, ENTITLEMENTS_CHANNEL)
    limiter = RateLimiter(
        RedisConfig.from_settings(settings),
        LimiterConfig(
            burst_seconds=settings.rate_limit_burst_seconds,
            local_share=settings.rate_limit_local_share,
            fail_closed=settings.rate_limit_fail_closed,
            lease_seconds=settings.rate_limit_lease_seconds,
        ),
    )
    users = spec.user_source(db) if spec.user_source else _ask(RegistryUserSource, "tenant", settings, identity, remote)
    tenants = TenantDirectory(cache, source, users)
    db.route_cells(tenants.cell_of)
    late_guard = LateCellGuard(db, lambda dsn: _check_isolation_at(dsn, spec, settings), unguarded)
    relay = AuditRelay(db, spec.schema, settings.targets["audit"], identity, service=spec.name) if spec.outbox else None
    runtime = Runtime(
        settings=settings,
        db=db,
        page_tokens=PageTokens(settings.page_token_secret),
        identity=identity,
        cache=cache,
        tenants=tenants,
        faults=Faults(settings.fault_points),
        audit=Auditor(db, spec.schema if spec.outbox else None, relay),
        plans=plans,
        entitlements=EntitlementDirectory(entitlement_cache, record_source, plans, tenants),
    )
    refusals = RefusalAudit(runtime.audit, tenants, settings.audit_refusal_window_seconds)
    endpoint: MetricsEndpoint | None = None
    try:
        await cache.start()
        await entitlement_cache.start()
        if relay is not None:
            await relay.start()
        await refusals.start()
        await late_guard.start()
        runtime.on_stop(late_guard.close)
        if not (await cache.wait_listening(5.0) and await entitlement_cache.wait_listening(1.0)):
            log.warning("not subscribed to tenant changes yet (Redis unreachable?); serving anyway")
        server, health, gate = build_server(spec, runtime, policies, limiter, refusals, reuse_port=role is not None)
        # One writer of the health check: readiness needs the database and no isolation breach.
        state = HealthState(health, spec.name, [s.full_name for s in spec.services])
        canary = IsolationCanary(db, spec.schema, spec.sentinels, settings.canary_interval_seconds, state.isolation)
        await canary.seed()  # a tenant table it cannot check stops the start, as the guard's findings do
        runtime.on_stop(canary.close)
        probe = DatabaseProbe(settings.runtime_database_url, state.database, application_name=probe_name(spec.name))
        runtime.on_stop(probe.close)
        if settings.metrics_port:
            endpoint = start_metrics_endpoint(
                settings.bind_host, settings.metrics_port, settings.prometheus_multiproc_dir
            )
            log.info("%s metrics on http://%s:%d/metrics", spec.name, settings.bind_host, settings.metrics_port)
        _meter_usage(spec, runtime)
        await server.start()
        for hook in runtime._starters:
            await hook()
        _freeze_startup_objects()
        await state.serving()
        canary.start()
        probe.start()
        log.info(
            "%s serving on %s:%d%s%s",
            spec.name,
            settings.bind_host,
            settings.port,
            " (TLS)" if settings.grpc_tls.serves_tls else "",
            "" if role is None else f" as worker {role.index}, pid {os.getpid()}",
        )

        await stop.wait()
        await health.enter_graceful_shutdown()
        if role is not None and role.orphaned:
            # Whoever restarts the service needs the port: close it now, let the calls in flight finish.
            log.warning("%s worker %d: port closed, draining for up to %gs", spec.name, role.index,
                        settings.shutdown_grace_seconds)  # fmt: skip
            await server.stop(settings.shutdown_grace_seconds)
        else:
            log.info(
                "%s shutting down: NOT_SERVING, refusing new calls in %gs, draining for up to %gs",
                spec.name,
                settings.shutdown_delay_seconds,
                settings.shutdown_grace_seconds,
            )
            # Give load balancers and clients that watch health a moment to stop sending new calls.
            await asyncio.sleep(settings.shutdown_delay_seconds)
            await gate.stop(server, settings.shutdown_grace_seconds)
    finally:
        for hook in runtime._stoppers:
            await hook()
        await refusals.close()  # the open tallies go to the outbox, which the next start relays
        if relay is not None:
            await relay.close()  # what it has not sent stays in the outbox for the next start
        await cache.close()
        await entitlement_cache.close()
        await limiter.close()
        for lookup in remote:
            await lookup.close()
        await db.close()
        if endpoint is not None:
            endpoint.close()
        tracing.shutdown()  # the spans still in the batch go out
    log.info("%s stopped", spec.name)


def _meter_usage(spec: ServiceSpec, runtime: Runtime) -> None:
    """Flush the usage counted on calls every ``USAGE_FLUSH_SECONDS``, and what is left once drained."""
    meter = usage.active()
    if spec.usage_sink is not None:
        meter.start(spec.usage_sink(runtime), runtime.settings.usage_flush_seconds)
        runtime.on_stop(meter.close)
        return
    remote = usage.RemoteUsageSink(runtime.settings.targets["features"], runtime.identity)
    meter.start(remote, runtime.settings.usage_flush_seconds)
    runtime.on_stop(meter.close, remote.close)


Lookup = TypeVar("Lookup", bound=InternalLookup)


def _freeze_startup_objects() -> None:
    """Leave what start-up built (modules, descriptors, policies, pools) out of every later
    garbage collection: a full collection otherwise walks all of it, and on this code base
    that held the event loop for 30-60 ms now and then, long enough for a Redis or database
    call in flight to time out. Collected once first, so nothing garbage is kept forever."""
    gc.collect()
    gc.freeze()


def _ask(
    kind: Callable[[str, ServiceIdentity], Lookup],
    owner: str,
    settings: Settings,
    identity: ServiceIdentity,
    opened: list[InternalLookup],
) -> Lookup:
    """A lookup of ``owner``'s internal contract, remembered in ``opened`` to be closed at shutdown."""
    lookup = kind(settings.targets[owner], identity)
    opened.append(lookup)
    return lookup


def _tenant_cache(settings: Settings, channel: str = TENANT_CHANNEL) -> TenantCache:
    redis = RedisConfig.from_settings(settings)
    return TenantCache(redis, local_seconds=settings.tenant_cache_seconds, channel=channel)


async def migrate_only(spec: ServiceSpec) -> None:
    settings = load(spec.name)
    logs.configure(spec.name, settings.log_level, settings.log_format)
    applied = await run_migrations(spec, settings)
    log.info("%s migrations applied: %s", spec.name, applied or "none (up to date)")


async def serve_or_run_workers(spec: ServiceSpec) -> int:
    """Serve in this process, or, with ``<SERVICE>_WORKERS`` above 1, as the parent of that many."""
    settings = load(spec.name)
    if settings.workers == 1:
        await serve(spec)
        return 0
    logs.configure(spec.name, settings.log_level, settings.log_format)
    check_ports(spec, settings)
    await migrate_on_start(spec, settings)
    return await run_workers(settings)


def main(spec: ServiceSpec) -> None:
    """Entry point of ``python -m services.<name> [migrate]``.

    Without arguments: serve (as ``<SERVICE>_WORKERS`` processes). With ``migrate``: apply
    pending migrations and exit (the release Job of a deployment, run with
    ``MIGRATION_DATABASE_URL``, the owner's DSN, and the service's ``<SERVICE>_DATABASE_URL``,
    whose password the runtime role is given). ``worker <index> <fd>`` is how the parent of
    several workers starts each (services/runtime/workers.py), not for operators.
    """
    args = sys.argv[1:]
    role = WorkerRole.from_args(args)
    if args not in ([], ["migrate"]) and role is None:
        sys.exit(f"usage: python -m services.{spec.name} [migrate]")
    try:
        if role is not None:
            asyncio.run(serve(spec, role))
        elif args:
            asyncio.run(migrate_only(spec))
        else:
            sys.exit(asyncio.run(serve_or_run_workers(spec)))
    except STARTUP_ERRORS as exc:
        # A refusal to start is an operator's message, not a traceback.
        logging.getLogger("towerco.server").critical("%s refused to start: %s", spec.name, exc)
        sys.exit(2)
