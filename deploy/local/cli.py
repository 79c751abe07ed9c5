"""``python -m deploy.local``: the commands behind ``make run``, ``make token`` and friends."""

from __future__ import annotations

import argparse
import io
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from towerco.features.v1.feature_gate_service_pb2_grpc import FeatureGateServiceStub

from gateway.config import GATEWAY_TLS_CERT_FILE, GatewaySettings
from services.runtime.environment import process_environment
from services.runtime.settings import BASE_DOMAIN, data_dir
from services.runtime.tls import GrpcTls

from .certs import ensure_certificates, local_tls
from .grpcurl import gateway_flags
from .prometheus import prometheus_binary
from .seed import SeedReport, seed_demo
from .stack import Stack, StackConfig, available_services
from .supervisor import Supervisor
from .tenant_commands import add_tenant_commands
from .tokens import ensure_keys, mint
from .usage_report import MonthError
from .usage_report import run as usage_report


def cmd_keys(args: argparse.Namespace) -> int:
    ensure_keys(data_dir() / "keys")
    print(f"dev keys in {data_dir() / 'keys'}")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    base_domain = BASE_DOMAIN.read(process_environment()).lower().strip(".")
    tls = ensure_certificates(local_tls(data_dir()).folder, base_domain)
    print(f"dev CA {tls.ca_cert} and server pair {tls.cert} ({tls.key})")
    print(f"  for localhost, 127.0.0.1, *.{base_domain} and the demo tenants' hosts")
    print("make run now serves the gateway over TLS (https; grpcurl -cacert); remove the folder to go back")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    keys = data_dir() / "keys"
    ensure_keys(keys)
    perms = [p.strip() for p in args.perms.split(",") if p.strip()] if args.perms else None
    try:
        token = mint(keys, tenant=args.tenant, role=args.role, permissions=perms, ttl=args.ttl)
    except ValueError as exc:
        print(f"make token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def cmd_usage_report(args: argparse.Namespace) -> int:
    config = StackConfig.from_env(data_dir())
    target = args.target or f"127.0.0.1:{config.ports['features']}"
    token = args.token
    if not token:
        ensure_keys(data_dir() / "keys")
        token = mint(data_dir() / "keys", role="platform_admin", ttl=600, subject="usage-report")
    report = io.StringIO()  # written out only once complete: no half a report on a failure
    try:
        with GrpcTls.from_env(process_environment()).channel(target) as channel:
            rows = usage_report(FeatureGateServiceStub(channel), token, args.month, report)
    except MonthError as exc:
        print(f"make usage-report: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"make usage-report: the feature gate at {target} answered {exc.code().name}: {exc.details()}",
              file=sys.stderr)  # fmt: skip
        return 1
    if args.out == "-":
        sys.stdout.write(report.getvalue())
    else:
        Path(args.out).write_text(report.getvalue(), encoding="utf-8")
    print(f"usage report {args.month}: {rows} tenants -> {args.out}", file=sys.stderr)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    stack = Stack(StackConfig.from_env(data_dir()))
    stack.start_infra()
    for name, versions in stack.migrate().items():
        print(f"{name}: applied {versions or 'nothing (up to date)'}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    # Only the servers whose pid files are in this DATA_DIR: never another checkout's stack.
    Stack(StackConfig.from_env(data_dir())).stop_infra()
    print(f"embedded PostgreSQL and Redis of {data_dir()} stopped")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    stack = Stack(StackConfig.from_env(data_dir()))
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    gave_up = None
    certs = local_tls(stack.config.data_dir)
    if certs.exists() and not GATEWAY_TLS_CERT_FILE.is_set(process_environment()):
        stack.config.env.update(certs.gateway_env())  # `make certs` was run: the gateway serves TLS
    try:
        names = available_services()
        stack.start_platform(dict.fromkeys(names))
        ports = {n: stack.config.ports[n] for n in names}
        tls = GrpcTls.from_env(stack.service_env())
        seeded = seed_demo(stack.keys_dir, ports, tls=tls) if "tenant" in names else None
        gateway_log = stack.config.data_dir / "gateway" / "envoy.log"
        gateway_log.parent.mkdir(parents=True, exist_ok=True)
        with gateway_log.open("ab") as log:
            gateway = stack.start_gateway(log=log)
        prometheus = stack.start_prometheus() if prometheus_binary() else None
        _banner(stack, names, seeded, gateway, gateway_log, prometheus, tls)
        gave_up = Supervisor(stack.supervised(names, gateway_log)).watch(lambda: stopping)
        if gave_up is not None:
            print(f"make run: {gave_up}; stopping", file=sys.stderr)
    finally:
        print("stopping services ...", file=sys.stderr)
        stack.stop_services()
        stack.stop_infra()
        print("stopped", file=sys.stderr)
    return 0 if gave_up is None else 1


def _service_line(stack: Stack, name: str) -> str:
    """A service's gRPC address, its workers and its Prometheus ``/metrics``."""
    metrics_port = stack.config.metrics_ports.get(name, 0)
    scraped = f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else "none (port 0)"
    processes = _workers(stack.config.workers.get(name, 1))
    return f"  {name:<11} 127.0.0.1:{stack.config.ports[name]} ({processes}, metrics {scraped})"


def _workers(count: int) -> str:
    return f"{count} worker{'s' if count > 1 else ''}"


def _banner(
    stack: Stack,
    names: list[str],
    seeded: SeedReport | None,
    gateway: GatewaySettings,
    gateway_log: Path,
    prometheus: str | None,
    tls: GrpcTls,
) -> None:
    grpcurl = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    certs = local_tls(stack.config.data_dir)
    # The CA of `make certs` when the gateway serves its pair; otherwise the operator's own.
    gateway_ca = (
        ""
        if not gateway.serves_tls
        else str(certs.ca_cert)
        if gateway.tls_cert_file == str(certs.cert)
        else "<CA file>"
    )
    direct = f"-cacert {tls.ca_file or '<CA file>'}" if tls.serves_tls else "-plaintext"
    sites = stack.config.ports.get("sites", 50052)
    tenant = stack.config.ports.get("tenant", 50051)
    features = stack.config.ports.get("features", 50053)
    edge = f"127.0.0.1:{gateway.port}"
    via_gateway = " ".join(gateway_flags(gateway_ca))
    page = f"{gateway.scheme}://tenant_a.{gateway.base_domain}:{gateway.port}/"
    lines = [
        "",
        "Towerco AIOps platform is up (Ctrl-C stops everything).",
        f"  PostgreSQL  {stack.database_url}",
        f"  Redis       {stack.redis_url}",
        *(_service_line(stack, name) for name in names),
        f"  gateway     {gateway.scheme}://{edge} (gRPC and gRPC-web{', TLS' if gateway.serves_tls else ''}; "
        f"{_workers(stack.config.gateway_workers)}; admin 127.0.0.1:{gateway.admin_port}; log {gateway_log})",
        f"  web page    {page}" if gateway.web_dir else "  web page    not built (needs npm: make web)",
        f"  Prometheus  {prometheus} (rules and alerts of deploy/prometheus; dashboards in deploy/grafana)"
        if prometheus
        else "  Prometheus  not started: no prometheus on PATH (Debian: apt-get install prometheus)",
        f"  demo data   {_demo_line(seeded)}",
        *(f"              {note}" for note in (seeded.notes if seeded else [])),
        "",
        "A crashed service, server or gateway is restarted (said so below); Ctrl-C stops everything.",
        "",
        "Try it through the gateway (the tenant is the subdomain):",
        "  TOKEN=$(make -s token TENANT=tenant_a)",
        f"  {grpcurl} {via_gateway} \\",
        f'      -authority tenant_a.{gateway.base_domain} -H "authorization: Bearer $TOKEN" \\',
        f"      -d '{{\"page_size\": 2}}' {edge} towerco.sites.v1.SiteService/ListSites",
        f"  {grpcurl} {via_gateway} \\",
        f'      -authority tenant_a.{gateway.base_domain} -d \'{{"host": "tenant_a.{gateway.base_domain}"}}\' \\',
        f"      {edge} towerco.tenant.v1.TenantRegistryService/GetBranding",
        "",
        "or straight to each service (the tenant is the token's):",
        f"  {grpcurl} {direct} 127.0.0.1:{sites} list",
        f'  {grpcurl} {direct} -H "authorization: Bearer $TOKEN" \\',
        f'      -d \'{{"site_id": "TWR-A-0001"}}\' 127.0.0.1:{sites} towerco.sites.v1.SiteService/GetSite',
        f'  {grpcurl} {direct} -H "authorization: Bearer $TOKEN" \\',
        f"      -d '{{\"page_size\": 2}}' 127.0.0.1:{sites} towerco.sites.v1.SiteService/ListSites",
        f'  {grpcurl} {direct} -d \'{{"host": "tenant_a.localhost"}}\' \\',
        f"      127.0.0.1:{tenant} towerco.tenant.v1.TenantRegistryService/GetBranding",
        "  ADMIN=$(make -s token ROLE=platform_admin)",
        f'  {grpcurl} {direct} -H "authorization: Bearer $ADMIN" -d \'{{"page_size": 10}}\' \\',
        f"      127.0.0.1:{tenant} towerco.tenant.v1.TenantRegistryService/ListTenants",
        f'  {grpcurl} {direct} -H "authorization: Bearer $TOKEN" \\',
        f"      127.0.0.1:{features} towerco.features.v1.FeatureGateService/GetEntitlements",
        "",
    ]
    print("\n".join(lines), flush=True)


def _demo_line(seeded: SeedReport | None) -> str:
    if seeded is None:
        return "none (no tenant service)"
    states = seeded.states.items()
    tenants = ", ".join(f"{tenant_id} ({state.removeprefix('STATE_').lower()})" for tenant_id, state in states)
    return f"tenants {tenants}; {seeded.sites} sites"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="start PostgreSQL, Redis and every service; Ctrl-C stops all").set_defaults(func=cmd_run)
    sub.add_parser("migrate", help="apply every service's pending migrations").set_defaults(func=cmd_migrate)
    sub.add_parser("stop", help="stop the embedded PostgreSQL and Redis").set_defaults(func=cmd_stop)
    sub.add_parser("keys", help="create the dev signing key and JWKS if missing").set_defaults(func=cmd_keys)
    sub.add_parser("certs", help="a self-signed CA and server pair under DATA_DIR/tls").set_defaults(func=cmd_certs)
    token = sub.add_parser("token", help="print a dev JWT")
    token.add_argument("--tenant", default="")
    token.add_argument("--role", default="admin")
    token.add_argument("--perms", default="", help="comma-separated; default: the role's permissions")
    token.add_argument("--ttl", type=int, default=3600)
    token.set_defaults(func=cmd_token)
    report = sub.add_parser("usage-report", help="write a month's usage per tenant as CSV (billing)")
    report.add_argument("--month", required=True, help="YYYY-MM, a calendar month in UTC")
    report.add_argument("--out", default="-", help="the CSV file; - (default) is standard output")
    report.add_argument("--target", default="", help="the feature gate host:port; default: the dev stack's")
    report.add_argument("--token", default="", help="a platform admin token; default: minted from the dev keys")
    report.set_defaults(func=cmd_usage_report)
    add_tenant_commands(sub)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result
