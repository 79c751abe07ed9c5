"""A PostgreSQL outage is logged when it starts and when it ends, not once per failed call.

The service under test runs on a PostgreSQL server of the test's own, which the test
stops and starts again; the session's database is never touched.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as pb_grpc

from deploy.local.dsn import runtime_dsn
from deploy.local.postgres import start_postgres, stop_postgres
from deploy.local.stack import Stack, service_spec
from services.runtime.logs import Outage
from services.runtime.server import migrate_service

from .conftest import OUTPUT
from .support import bearer, expect_error, free_port

OUTAGE_LINE = "PostgreSQL unavailable"
RECOVERY_LINE = "PostgreSQL available again"


class PrivatePostgres:
    """A PostgreSQL server of one test's own, migrated for one service, stopped at will."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir, self.port = data_dir, port
        self.dsn = ""

    def start(self) -> None:
        self.dsn = start_postgres(self.data_dir, self.port, fast=True).superuser_dsn()

    def stop(self) -> None:
        stop_postgres(self.data_dir)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    # Under test-output/ like the session's server, not tmp_path: the server runs as another
    # user when the tests run as root, and pytest makes its own temporary folders private.
    folder = OUTPUT / f".private-pg-{uuid.uuid4().hex[:8]}"
    server = PrivatePostgres(folder / "pg", free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_database_outage_is_logged_once_and_its_end_once(
    stack: Stack,
    private_postgres: PrivatePostgres,
    extra_service: Callable[..., Any],
    new_tenant: Callable[..., str],
    token: Callable[..., str],
    eventually: Callable[..., Any],
) -> None:
    asyncio.run(migrate_service(service_spec("sites"), private_postgres.dsn, stack.app_db_password))
    sites = extra_service(
        "sites",
        {
            "SITES_DATABASE_URL": runtime_dsn(private_postgres.dsn, "sites", stack.app_db_password),
            "DB_POOL_MIN_SIZE": "2",
            "DB_POOL_MAX_SIZE": "4",
            "DB_ACQUIRE_TIMEOUT_SECONDS": "2",
        },
    )
    md = bearer(token(new_tenant()))
    with grpc.insecure_channel(sites.target) as channel:
        stub = pb_grpc.SiteServiceStub(channel)
        stub.CreateSite(pb.CreateSiteRequest(site_id="UP-1", site=pb.Site(name="before")), metadata=md, timeout=10)

        private_postgres.stop()
        errors = [expect_error(stub.ListSites, pb.ListSitesRequest(), metadata=md) for _ in range(30)]
        errors += [
            expect_error(
                stub.CreateSite, pb.CreateSiteRequest(site_id=f"DOWN-{i}", site=pb.Site(name="x")), metadata=md
            )
            for i in range(10)
        ]
        for error in errors:
            assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE"), error
            assert error.retry is not None, "UNAVAILABLE without RetryInfo: the client cannot tell when to come back"

        private_postgres.start()
        eventually(lambda: stub.ListSites(pb.ListSitesRequest(), metadata=md, timeout=10), within=15)
        names = [s.name for s in stub.ListSites(pb.ListSitesRequest(), metadata=md, timeout=10).sites]
        assert names == ["before"]

    output = eventually(lambda: _logged_recovery(sites.output()), within=5)
    assert "Traceback" not in output, output
    assert output.count(OUTAGE_LINE) == 1, output
    assert output.count(RECOVERY_LINE) == 1, output


def _logged_recovery(output: str) -> str:
    assert RECOVERY_LINE in output
    return output


def test_an_outage_logs_its_start_and_end_once_however_many_failures(caplog: pytest.LogCaptureFixture) -> None:
    outage = Outage("Redis", logging.getLogger("test.outage"))
    with caplog.at_level(logging.INFO, logger="test.outage"):
        outage.recovered()  # nothing was down: nothing to say
        for _ in range(50):
            outage.failed(ConnectionRefusedError(111, "Connection refused"))
        assert outage.down
        outage.recovered()
        outage.recovered()
        outage.failed(TimeoutError("timed out"))
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == ["WARNING", "INFO", "WARNING"], lines
    assert "Redis unavailable (ConnectionRefusedError: [Errno 111] Connection refused)" in lines[0][1]
    assert "Redis available again" in lines[1][1] and "(50 failed attempts)" in lines[1][1]
    assert all(r.exc_info is None for r in caplog.records), "an outage is not a bug: no traceback"
    assert (outage.failures, outage.outages) == (51, 2)
