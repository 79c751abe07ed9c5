"""An alert of deploy/prometheus/rules firing on a real Prometheus from a real service's metrics.

The promtool tests (tests/test_prometheus_rules.py) prove each alert's logic on made-up
series; this proves the rules meet the series the services really expose (names and
labels), with the one alert that needs no waiting: an isolation breach. A sites process
of the test's own, on a PostgreSQL server of its own, has its tenant policy broken on
purpose; a Prometheus scraping it (and the session's other services, which stay quiet)
fires TenantIsolationBreach for sites alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg

from deploy.local.dsn import runtime_dsn
from deploy.local.prometheus import query
from deploy.local.stack import Stack, StackConfig, service_spec
from services.runtime.server import migrate_service

from .support import free_port
from .test_outage_logging import PrivatePostgres, private_postgres  # noqa: F401 - the fixture

FIRING = 'ALERTS{alertname="TenantIsolationBreach", alertstate="firing"}'


async def _admin(dsn: str, statement: str) -> None:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def test_a_real_isolation_breach_fires_the_alert_for_that_service_alone(
    stack: Stack,
    private_postgres: PrivatePostgres,  # noqa: F811 - the fixture imported above
    extra_service: Callable[..., Any],
    eventually: Callable[..., Any],
    tmp_path: Path,
) -> None:
    asyncio.run(migrate_service(service_spec("sites"), private_postgres.dsn, stack.app_db_password))
    metrics_port = free_port()
    extra_service(
        "sites",
        {
            "SITES_DATABASE_URL": runtime_dsn(private_postgres.dsn, "sites", stack.app_db_password),
            "CANARY_INTERVAL_SECONDS": "0.2",
            "SITES_METRICS_PORT": str(metrics_port),
        },
    )
    # A Prometheus of the test's own: this sites process in the session's sites' place.
    watched = StackConfig(
        data_dir=tmp_path,
        metrics_ports={**stack.config.metrics_ports, "sites": metrics_port},
        gateway_admin_port=stack.config.gateway_admin_port,
    )
    watcher = Stack(watched)
    url = watcher.start_prometheus(port=free_port(), scrape_interval="1s")
    try:

        def scraped() -> None:
            up = {sample["metric"]["job"]: sample["value"][1] for sample in query(url, 'up{job!="gateway"}')}
            assert up == dict.fromkeys(("tenant", "sites", "features", "audit"), "1"), up

        eventually(scraped, within=10)
        assert query(url, FIRING) == [], "an alert before any breach"

        asyncio.run(_admin(private_postgres.dsn, "ALTER POLICY tenant_isolation ON sites.sites USING (true)"))

        def fired() -> None:
            alerts = [sample["metric"] for sample in query(url, FIRING)]
            assert [(alert["service"], alert["severity"]) for alert in alerts] == [("sites", "critical")], alerts

        eventually(fired, within=20, interval=0.2)
    finally:
        watcher.stop_services()
