"""Read RPCs served by a streaming replica, with RLS intact there, and read-your-writes kept.

A primary and a streaming replica of this module's own (``pg_basebackup -R`` from the
embedded server's binaries), the sites schema migrated on the primary, and a sites
process given both DSNs (``SITES_DATABASE_URL``, ``SITES_READ_DATABASE_URL``). Which
server answered is shown by pausing the replica's replay and writing a row on the primary
behind the service's back: a read that misses it came from the replica.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as pb_grpc

from deploy.local.postgres import SERVER_USER, postgres_bin_dir, start_postgres, stop_postgres
from deploy.local.procs import ensure_system_user, give_to, run_command, wait_until
from deploy.local.stack import Stack, service_spec
from services.runtime.server import migrate_service

from .conftest import OUTPUT
from .support import bearer, expect_error, free_port
from .support.processes import ExtraService, ExtraServices


@dataclass
class Replication:
    folder: Path
    primary_dsn: str  # superuser
    replica_dsn: str  # superuser
    runtime_dsn: str  # sites_app on the primary
    read_dsn: str  # sites_app on the replica

    def sql(self, dsn: str, query: str, *args: object) -> Any:
        async def run() -> Any:
            conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn)
            try:
                return await conn.fetchval(query, *args)
            finally:
                await conn.close()

        return asyncio.run(run())

    def wait_replayed(self) -> None:
        """Until the replica has replayed everything the primary has written so far."""
        position = self.sql(self.primary_dsn, "SELECT pg_current_wal_insert_lsn()")
        replayed = wait_until(
            lambda: self.sql(self.replica_dsn, "SELECT pg_last_wal_replay_lsn() >= $1", position), 20, interval=0.05
        )
        assert replayed, "the replica did not replay the primary's WAL"

    def pause_replay(self) -> None:
        self.sql(self.replica_dsn, "SELECT pg_wal_replay_pause()")
        assert wait_until(lambda: self.sql(self.replica_dsn, "SELECT pg_get_wal_replay_pause_state()") == "paused", 10)

    def resume_replay(self) -> None:
        self.sql(self.replica_dsn, "SELECT pg_wal_replay_resume()")

    def insert_behind_the_service(self, tenant: str, site_id: str) -> None:
        """A site row written on the primary directly (as the superuser), not through the service."""
        self.sql(
            self.primary_dsn,
            "INSERT INTO sites.sites (tenant_id, site_id, name) VALUES ($1, $2, 'written behind') RETURNING site_id",
            tenant,
            site_id,
        )


def _on(dsn: str, port: int, database: str = "postgres") -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{port}"
    return urlunsplit((parts.scheme, netloc, f"/{database}", parts.query, ""))


@pytest.fixture(scope="module")
def replication(sites_runtime_dsn: str) -> Iterator[Replication]:
    folder = OUTPUT / f".replica-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    user = ensure_system_user(SERVER_USER)
    give_to(folder, user)  # pg_basebackup runs as the server's user and writes here
    primary_dir, replica_dir = folder / "primary", folder / "replica"
    try:
        primary = start_postgres(primary_dir, free_port(), fast=True)
        replica_port = free_port()
        backup = run_command(
            [
                str(postgres_bin_dir() / "pg_basebackup"),
                f"--dbname=host=127.0.0.1 port={primary.port} user=postgres",
                f"--pgdata={replica_dir}",
                "--write-recovery-conf",  # standby.signal and primary_conninfo: a streaming replica
                "--wal-method=stream",
                "--checkpoint=fast",
                "--no-sync",
            ],
            user=user,
            timeout=60,
        )
        assert backup.returncode == 0, backup.output
        replica = start_postgres(replica_dir, replica_port, fast=True)
        password = unquote(urlsplit(sites_runtime_dsn).password or "")
        asyncio.run(migrate_service(service_spec("sites"), primary.superuser_dsn(), password))
        replication = Replication(
            folder,
            primary.superuser_dsn(),
            replica.superuser_dsn(),
            _on(sites_runtime_dsn, primary.port),
            _on(sites_runtime_dsn, replica.port),
        )
        assert replication.sql(replication.replica_dsn, "SELECT pg_is_in_recovery()") is True
        replication.wait_replayed()  # the roles and schema are on the replica too
        yield replication
    finally:
        stop_postgres(replica_dir)
        stop_postgres(primary_dir)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def sites_with_replica(stack: Stack, replication: Replication) -> Iterator[ExtraService]:
    services = ExtraServices(stack, OUTPUT / "logs")
    try:
        yield services.start(
            "sites",
            {"SITES_DATABASE_URL": replication.runtime_dsn, "SITES_READ_DATABASE_URL": replication.read_dsn},
        )
    finally:
        services.stop()


def _listed(stub: pb_grpc.SiteServiceStub, metadata: Any) -> set[str]:
    return {s.site_id for s in stub.ListSites(pb.ListSitesRequest(), metadata=metadata, timeout=10).sites}


def _create(stub: pb_grpc.SiteServiceStub, metadata: Any, site_id: str) -> None:
    stub.CreateSite(pb.CreateSiteRequest(site_id=site_id, site=pb.Site(name=site_id)), metadata=metadata, timeout=10)


def test_read_rpcs_are_served_by_the_replica_where_rls_still_hides_other_tenants(
    sites_with_replica: ExtraService,
    replication: Replication,
    new_tenant: Callable[..., str],
    token: Callable[..., str],
) -> None:
    a, b = new_tenant("rra"), new_tenant("rrb")
    md_a, md_b = bearer(token(a)), bearer(token(b))
    with grpc.insecure_channel(sites_with_replica.target) as channel:
        stub = pb_grpc.SiteServiceStub(channel)
        _create(stub, md_a, "A-1")  # writes go to the primary: on the replica they would fail, read-only
        _create(stub, md_b, "B-1")
        replication.wait_replayed()
        assert _listed(stub, md_a) == {"A-1"}
        assert _listed(stub, md_b) == {"B-1"}

        replication.pause_replay()
        try:
            replication.insert_behind_the_service(a, "A-PRIMARY-ONLY")
            # On the primary now, not on the replica: the reads that miss it were the replica's.
            assert _listed(stub, md_a) == {"A-1"}, "ListSites was not served by the replica"
            missing = expect_error(stub.GetSite, pb.GetSiteRequest(site_id="A-PRIMARY-ONLY"), metadata=md_a)
            assert missing.code == grpc.StatusCode.NOT_FOUND, "GetSite was not served by the replica"
            assert stub.GetSite(pb.GetSiteRequest(site_id="A-1"), metadata=md_a, timeout=10).name == "A-1"
            # ... and there RLS showed each tenant its own rows only.
            assert _listed(stub, md_b) == {"B-1"}
            missing = expect_error(stub.GetSite, pb.GetSiteRequest(site_id="A-1"), metadata=md_b)
            assert missing.code == grpc.StatusCode.NOT_FOUND
        finally:
            replication.resume_replay()
        replication.wait_replayed()
        assert _listed(stub, md_a) == {"A-1", "A-PRIMARY-ONLY"}

    unbound = replication.sql(replication.read_dsn, "SELECT count(*) FROM sites.sites")
    assert unbound == 0, "the replica shows the runtime role rows with no tenant bound"


def test_a_tenants_own_writes_are_read_back_from_the_primary_while_the_replica_lags(
    sites_with_replica: ExtraService,
    replication: Replication,
    new_tenant: Callable[..., str],
    token: Callable[..., str],
) -> None:
    writer, bystander = new_tenant("rrw"), new_tenant("rrs")
    md_w, md_s = bearer(token(writer)), bearer(token(bystander))
    with grpc.insecure_channel(sites_with_replica.target) as channel:
        stub = pb_grpc.SiteServiceStub(channel)
        _create(stub, md_w, "W-1")
        _create(stub, md_s, "S-1")
        replication.wait_replayed()
        _listed(stub, md_w), _listed(stub, md_s)  # both caught up: each tenant's next read may use the replica

        replication.pause_replay()
        try:
            replication.insert_behind_the_service(bystander, "S-PRIMARY-ONLY")
            _create(stub, md_w, "W-2")
            # The writer's reads see its write at once (the primary, the replica being behind it) ...
            assert stub.GetSite(pb.GetSiteRequest(site_id="W-2"), metadata=md_w, timeout=10).name == "W-2"
            assert _listed(stub, md_w) == {"W-1", "W-2"}
            stub.UpdateSite(
                pb.UpdateSiteRequest(
                    site=pb.Site(site_id="W-1", name="renamed"), update_mask=FieldMask(paths=["name"])
                ),
                metadata=md_w,
                timeout=10,
            )
            stub.DeleteSite(pb.DeleteSiteRequest(site_id="W-2"), metadata=md_w, timeout=10)
            assert _listed(stub, md_w) == {"W-1"}
            # ... while the bystander, which wrote nothing meanwhile, still reads the replica.
            assert _listed(stub, md_s) == {"S-1"}
        finally:
            replication.resume_replay()
        replication.wait_replayed()
        assert _listed(stub, md_s) == {"S-1", "S-PRIMARY-ONLY"}


def test_a_read_dsn_that_would_bypass_rls_stops_the_start(stack: Stack, replication: Replication) -> None:
    services = ExtraServices(stack, OUTPUT / "logs")
    try:
        service = services.start(
            "sites",
            {"SITES_DATABASE_URL": replication.runtime_dsn, "SITES_READ_DATABASE_URL": replication.replica_dsn},
            wait=False,
        )
        assert service.process.wait(60) == 2
    finally:
        services.stop()
    refusal = service.output().strip().splitlines()[-1]
    assert "tenant isolation is not enforced" in refusal, refusal
    assert "runtime role postgres has SUPERUSER" in refusal, refusal


def test_reads_fall_back_to_the_primary_when_the_replica_is_down(
    sites_with_replica: ExtraService,
    replication: Replication,
    new_tenant: Callable[..., str],
    token: Callable[..., str],
) -> None:
    tenant = new_tenant("rrd")
    metadata = bearer(token(tenant))
    with grpc.insecure_channel(sites_with_replica.target) as channel:
        stub = pb_grpc.SiteServiceStub(channel)
        _create(stub, metadata, "D-1")
        stop_postgres(replication.folder / "replica")  # the module's last use of it
        replication.insert_behind_the_service(tenant, "D-PRIMARY-ONLY")
        assert _listed(stub, metadata) == {"D-1", "D-PRIMARY-ONLY"}
    assert "PostgreSQL read replica unavailable" in sites_with_replica.output()


def test_a_process_started_while_the_replica_is_down_serves_from_the_primary(
    stack: Stack,
    replication: Replication,
    new_tenant: Callable[..., str],
    token: Callable[..., str],
) -> None:
    stop_postgres(replication.folder / "replica")  # stopped already when the test above ran
    tenant = new_tenant("rrs")
    metadata = bearer(token(tenant))
    services = ExtraServices(stack, OUTPUT / "logs")
    try:
        started = services.start(
            "sites",
            {"SITES_DATABASE_URL": replication.runtime_dsn, "SITES_READ_DATABASE_URL": replication.read_dsn},
        )
        replication.insert_behind_the_service(tenant, "S-1")
        with grpc.insecure_channel(started.target) as channel:
            assert _listed(pb_grpc.SiteServiceStub(channel), metadata) == {"S-1"}
    finally:
        services.stop()
    assert "read replica unreachable at start-up" in started.output()
