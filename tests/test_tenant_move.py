"""MoveTenant between two real PostgreSQL servers (cells), online: issue 18's acceptance.

A stack of this module's own (cell1 home, cell2), whose registry has the fault point
``tenant_move.copy`` armed once: the first move fails mid-copy (after its rows were written
to the target, before that transaction commits) and must roll back; the next one goes through.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import asyncpg
import grpc
import pytest
from towerco.audit.v1 import audit_log_service_pb2 as audit_pb
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb

from deploy.local.tenant_transfer import cell_tables
from services.runtime.cells import Cell
from services.tenant.tenant_move import MOVED
from tests.support.cells_stack import CellsStack, cells_stack
from tests.support.errors import rich_error
from tests.support.metadata import Metadata, bearer
from tests.support.requests import create_site, set_limit

from .conftest import OUTPUT

SITES = 2000


@pytest.fixture(scope="module")
def moves() -> Iterator[CellsStack]:
    env = {"LOG_LEVEL": "INFO", "FAULT_POINTS": "tenant_move.copy:1"}
    with cells_stack(OUTPUT, "moves", (Cell("cell1"), Cell("cell2")), env) as stack:
        yield stack


def _move(moves: CellsStack, tenant_id: str) -> tenant_pb.TenantMove:
    """MoveTenant to cell2 (retried once with its request_id: the same move), then GetMove until it ends."""
    admin = bearer(moves.platform)
    request = tenant_pb.MoveTenantRequest(tenant_id=tenant_id, target_cell="cell2", request_id=uuid.uuid4().hex)
    move: tenant_pb.TenantMove = moves.registry.MoveTenant(request, metadata=admin, timeout=10)
    assert moves.registry.MoveTenant(request, metadata=admin, timeout=10).move_id == move.move_id
    ends = (tenant_pb.TenantMove.STAGE_DONE, tenant_pb.TenantMove.STAGE_ROLLED_BACK)
    for _ in range(600):
        move = moves.registry.GetMove(tenant_pb.GetMoveRequest(move_id=move.move_id), metadata=admin, timeout=10)
        if move.stage in ends:
            return move
        time.sleep(0.1)
    raise AssertionError(f"the move did not end: {move}")


def _cell_of(moves: CellsStack, tenant_id: str) -> str:
    request = tenant_pb.GetTenantRequest(tenant_id=tenant_id)
    return str(moves.registry.GetTenant(request, metadata=bearer(moves.platform), timeout=10).cell)


def _counts(dsn: str, tenant_id: str) -> dict[str, int]:
    """The tenant's rows in each moved table of one server, read as its administrator (no RLS)."""

    async def count() -> dict[str, int]:
        conn = await asyncpg.connect(dsn)
        try:
            return {t: await conn.fetchval(f"SELECT count(*) FROM {t} WHERE tenant_id = $1", tenant_id) for t in MOVED}
        finally:
            await conn.close()

    return asyncio.run(count())


def _seed_sites(dsn: str, tenant_id: str, count: int) -> None:
    async def seed() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.copy_records_to_table(
                "sites",
                schema_name="sites",
                columns=["tenant_id", "site_id", "name"],
                records=[(tenant_id, f"seeded-{i}", f"Seeded {i}") for i in range(count)],
            )
        finally:
            await conn.close()

    asyncio.run(seed())


def _site_ids(dsn: str, tenant_id: str) -> list[str]:
    async def read() -> list[str]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT site_id FROM sites.sites WHERE tenant_id = $1", tenant_id)
            return [row["site_id"] for row in rows]
        finally:
            await conn.close()

    return asyncio.run(read())


def test_moved_tables_are_the_cell_tables_an_export_carries_with_idempotency_and_usage_records() -> None:
    kept = {"sites.create_requests", "features.usage_hourly", "features.usage_flushes"}
    assert set(MOVED) == {t.name for t in cell_tables()} | kept


def test_a_failure_mid_copy_leaves_the_tenant_on_cell1_unfrozen_and_intact(moves: CellsStack) -> None:
    tenant_id = moves.create_tenant(cell="cell1").tenant_id
    md = moves.token(tenant_id)
    for i in range(5):
        create_site(moves.sites, md, f"tower-{i}")
    before = _counts(moves.dsn("cell1"), tenant_id)

    move = _move(moves, tenant_id)  # tenant_move.copy is armed once

    assert move.stage == tenant_pb.TenantMove.STAGE_ROLLED_BACK, move
    assert "tenant_move.copy" in move.error
    assert _cell_of(moves, tenant_id) == "cell1"
    after = _counts(moves.dsn("cell1"), tenant_id)
    events = "audit.events"  # delivered by the relays meanwhile (the move's own events among them): more
    assert {**after, events: 0} == {**before, events: 0}
    assert after[events] >= before[events]
    assert not any(_counts(moves.dsn("cell2"), tenant_id).values())
    create_site(moves.sites, md, "after-the-rollback")  # unfrozen
    assert len(moves.sites.ListSites(sites_pb.ListSitesRequest(page_size=100), metadata=md).sites) == 6
    check = moves.audit.VerifyChain(audit_pb.VerifyChainRequest(tenant_id=tenant_id), metadata=bearer(moves.platform))
    assert check.valid, check


@dataclass
class Client:
    """Writes (CreateSite, retried with its request_id while refused) and reads, until told to stop."""

    moves: CellsStack
    md: Metadata
    stop: threading.Event = field(default_factory=threading.Event)
    acknowledged: list[str] = field(default_factory=list)
    refused: int = 0
    #: Set once the move is seen finished: refusals after it would be writes refused outside the freeze.
    moved: threading.Event = field(default_factory=threading.Event)
    refused_after_the_move: int = 0
    reads: int = 0
    failures: list[str] = field(default_factory=list)

    def run(self) -> None:
        n = 0
        while not self.stop.is_set() and not self.failures:
            n += 1
            site_id = f"live-{n}"
            request = sites_pb.CreateSiteRequest(
                site_id=site_id, site=sites_pb.Site(name=f"Live {n}"), request_id=uuid.uuid4().hex
            )
            while not self.failures:
                try:
                    self.moves.sites.CreateSite(request, metadata=self.md, timeout=10)
                    self.acknowledged.append(site_id)
                    break
                except grpc.RpcError as error:
                    rich = rich_error(error)
                    if rich.code == grpc.StatusCode.UNAVAILABLE and rich.reason == "TENANT_MOVING":
                        assert rich.retry is not None
                        self.refused += 1
                        self.refused_after_the_move += self.moved.is_set()
                        time.sleep(0.1)
                        continue
                    if rich.reason == "RATE_LIMITED":  # the tenant's write rate, not the move: retried alike
                        time.sleep(0.2)
                        continue
                    self.failures.append(f"CreateSite {site_id}: {rich.code} {rich.reason} {rich.message}")
            try:
                got = self.moves.sites.GetSite(
                    sites_pb.GetSiteRequest(site_id="seeded-7"), metadata=self.md, timeout=10
                )
                assert got.site_id == "seeded-7"
                self.reads += 1
                time.sleep(0.05)
            except grpc.RpcError as error:
                rich = rich_error(error)
                self.failures.append(f"GetSite: {rich.code} {rich.reason} {rich.message}")


def test_a_tenant_moves_to_cell2_while_a_client_reads_and_writes(moves: CellsStack) -> None:
    tenant_id = moves.create_tenant(cell="cell1").tenant_id
    md = moves.token(tenant_id)
    set_limit(moves.features, moves.platform, tenant_id, "max_sites", 100_000)
    _seed_sites(moves.dsn("cell1"), tenant_id, SITES)
    for i in range(10):  # audit events of the tenant's own
        create_site(moves.sites, md, f"tower-{i}")
    client = Client(moves, md)
    worker = threading.Thread(target=client.run, daemon=True)
    worker.start()
    try:
        while len(client.acknowledged) < 3 and not client.failures:
            time.sleep(0.05)
        move = _move(moves, tenant_id)
        client.moved.set()
        acknowledged_at_switch = len(client.acknowledged)
        while len(client.acknowledged) < acknowledged_at_switch + 3 and not client.failures:
            time.sleep(0.05)  # writes go on in the target cell
    finally:
        client.stop.set()
        worker.join(30)
    assert not client.failures, client.failures
    assert move.stage == tenant_pb.TenantMove.STAGE_DONE, move
    assert client.refused_after_the_move == 0  # writes were refused during the freeze only
    assert move.freeze_duration.ToMilliseconds() > 0
    assert move.rows["sites.sites"] >= SITES + 10
    print(f"moved {move.rows['sites.sites']} sites; writes refused for {move.freeze_duration.ToMilliseconds()} ms")
    print(f"client: {len(client.acknowledged)} writes acknowledged, {client.refused} refusals, {client.reads} reads")

    assert _cell_of(moves, tenant_id) == "cell2"
    # No acknowledged write lost or doubled: each exactly once in cell2, nothing else written.
    on_target = _site_ids(moves.dsn("cell2"), tenant_id)
    assert len(on_target) == len(set(on_target))
    live = sorted(s for s in on_target if s.startswith("live-"))
    assert live == sorted(client.acknowledged)
    assert len(on_target) == SITES + 10 + len(client.acknowledged)
    # The source purged.
    assert not any(_counts(moves.dsn("cell1"), tenant_id).values()), _counts(moves.dsn("cell1"), tenant_id)
    # The chain verifies on the target, through the audit service (now reading cell2).
    check = moves.audit.VerifyChain(audit_pb.VerifyChainRequest(tenant_id=tenant_id), metadata=bearer(moves.platform))
    assert check.valid and check.events_checked >= 10, check
    assert _counts(moves.dsn("cell2"), tenant_id)["audit.events"] >= 10
