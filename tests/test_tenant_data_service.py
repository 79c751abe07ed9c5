"""TenantDataService of the sites service: prepare, apply, undo and purge, over real gRPC.

The tenant registry drives these calls with its service identity; here the tests do, against
the running sites service (interceptor chain, PostgreSQL with RLS). Sites are arranged
through the public SiteService with each tenant's own token (or, in bulk, as the superuser),
and what the database holds afterwards is read as the superuser.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest
from towerco.internal.v1 import tenant_data_pb2 as pb
from towerco.internal.v1 import tenant_data_pb2_grpc as pb_grpc
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc

from services.features.tenant_data_spec import FEATURES_TENANT_DATA
from services.runtime.tenant_data_service import CopySpec, TenantDataSpec, spec_problems
from services.sites.tenant_data_spec import SITES_TENANT_DATA

from .support import RichError, bearer, expect_error
from .support.errors import expect_refusal
from .support.metadata import Metadata

DOMAIN = "towerco.internal.v1.TenantDataService"
TABLES = ("sites", "create_requests", "tenant_migrations", "tenant_migration_rows")


@dataclass
class TenantData:
    """TenantDataService as the tenant registry calls it: with a platform service token."""

    stub: pb_grpc.TenantDataServiceStub
    md: Metadata

    def prepare(
        self, migration_id: str, source: str, target: str, data_type: str = "sites"
    ) -> pb.PrepareTenantMigrationResponse:
        request = pb.PrepareTenantMigrationRequest(
            migration_id=migration_id, source_tenant_id=source, target_tenant_id=target, data_type=data_type
        )
        return self.stub.PrepareTenantMigration(request, metadata=self.md, timeout=10)

    def apply(self, migration_id: str, source: str, target: str, data_type: str = "sites") -> int:
        request = pb.ApplyTenantMigrationRequest(
            migration_id=migration_id, source_tenant_id=source, target_tenant_id=target, data_type=data_type
        )
        return self.stub.ApplyTenantMigration(request, metadata=self.md, timeout=10).row_count

    def undo(self, migration_id: str, target: str, data_type: str = "sites") -> int:
        request = pb.UndoTenantMigrationRequest(migration_id=migration_id, target_tenant_id=target, data_type=data_type)
        return self.stub.UndoTenantMigration(request, metadata=self.md, timeout=10).row_count

    def purge(self, tenant: str) -> int:
        return self.stub.PurgeTenantData(
            pb.PurgeTenantDataRequest(tenant_id=tenant), metadata=self.md, timeout=10
        ).row_count

    def fails(
        self, method: str, request: Any, code: grpc.StatusCode, reason: str, md: Metadata | None = None
    ) -> RichError:
        return expect_refusal(getattr(self.stub, method), request, self.md if md is None else md, code, reason, DOMAIN)


@dataclass
class Tenant:
    """One tenant's view of the public SiteService."""

    stub: sites_grpc.SiteServiceStub
    tenant: str
    md: Metadata

    def create(self, site_id: str, name: str = "", request_id: str = "", **location: Any) -> sites_pb.Site:
        site = sites_pb.Site(name=name or f"{self.tenant} {site_id}")
        if location:
            site.location.CopyFrom(sites_pb.Location(**location))
        site.configuration.update({"vendor": "acme", "bands": ["n78", "b3"], "power": {"kw": 12.5}})
        request = sites_pb.CreateSiteRequest(site_id=site_id, site=site, request_id=request_id)
        return self.stub.CreateSite(request, metadata=self.md, timeout=10)

    def get(self, site_id: str) -> sites_pb.Site:
        return self.stub.GetSite(sites_pb.GetSiteRequest(site_id=site_id), metadata=self.md, timeout=10)

    def ids(self, region: str = "") -> list[str]:
        request = sites_pb.ListSitesRequest(page_size=1000, region=region)
        response = self.stub.ListSites(request, metadata=self.md, timeout=10)
        assert not response.next_page_token
        return [s.site_id for s in response.sites]


@pytest.fixture(scope="session")
def tenant_data_stub(sites_target: str) -> Iterator[pb_grpc.TenantDataServiceStub]:
    with grpc.insecure_channel(sites_target) as channel:
        yield pb_grpc.TenantDataServiceStub(channel)


@pytest.fixture
def tenant_data(tenant_data_stub: pb_grpc.TenantDataServiceStub, service_token: Callable[..., str]) -> TenantData:
    return TenantData(tenant_data_stub, bearer(service_token(service="tenant")))


@pytest.fixture
def tenants(
    sites: sites_grpc.SiteServiceStub, token: Callable[..., str], tenant_pair: tuple[str, str]
) -> tuple[Tenant, Tenant]:
    """The source and the target of a migration, both fresh."""
    source, target = tenant_pair
    return Tenant(sites, source, bearer(token(source))), Tenant(sites, target, bearer(token(target)))


@pytest.fixture
def third(sites: sites_grpc.SiteServiceStub, token: Callable[..., str]) -> Tenant:
    tenant = f"tc_{uuid.uuid4().hex[:10]}"
    return Tenant(sites, tenant, bearer(token(tenant)))


def new_migration() -> str:
    return str(uuid.uuid4())


async def site_rows(admin: asyncpg.Connection[Any], tenant: str) -> dict[str, tuple[Any, ...]]:
    """Every stored column of a tenant's sites, by site_id (read as the superuser)."""
    rows = await admin.fetch(
        "SELECT site_id, name, location::text, region, configuration::text, create_time, update_time"
        " FROM sites.sites WHERE tenant_id = $1",
        tenant,
    )
    return {r["site_id"]: tuple(r) for r in rows}


async def row_counts(admin: asyncpg.Connection[Any], tenant: str) -> dict[str, int]:
    return {
        table: await admin.fetchval(f"SELECT count(*) FROM sites.{table} WHERE tenant_id = $1", tenant)
        for table in TABLES
    }


async def tracked_keys(admin: asyncpg.Connection[Any], tenant: str) -> list[tuple[str, str, list[str]]]:
    rows = await admin.fetch(
        "SELECT migration_id, data_type, row_key FROM sites.tenant_migration_rows WHERE tenant_id = $1 ORDER BY 3",
        tenant,
    )
    return [(r["migration_id"], r["data_type"], list(r["row_key"])) for r in rows]


async def insert_sites(admin: asyncpg.Connection[Any], tenant: str, site_ids: list[str]) -> None:
    await admin.executemany(
        "INSERT INTO sites.sites (tenant_id, site_id, name) VALUES ($1, $2, $3)",
        [(tenant, s, f"{tenant} {s}") for s in site_ids],
    )


# --- Prepare ----------------------------------------------------------------------------------


async def test_prepare_counts_source_rows_and_names_conflicts_without_writing(tenant_data, tenants, admin):
    source, target = tenants
    for site_id in ("A-1", "A-2", "SHARED-1", "SHARED-2"):
        source.create(site_id)
    for site_id in ("B-1", "SHARED-1", "SHARED-2"):
        target.create(site_id)
    before = {t.tenant: (await site_rows(admin, t.tenant), await row_counts(admin, t.tenant)) for t in tenants}

    response = tenant_data.prepare(new_migration(), source.tenant, target.tenant)

    assert response.row_count == 4
    assert list(response.conflicts) == ["SHARED-1", "SHARED-2"]
    after = {t.tenant: (await site_rows(admin, t.tenant), await row_counts(admin, t.tenant)) for t in tenants}
    assert after == before
    assert before[target.tenant][1]["tenant_migrations"] == 0


async def test_prepare_into_a_tenant_without_those_ids_reports_no_conflicts(tenant_data, tenants, third):
    source, target = tenants
    source.create("A-1")
    source.create("A-2")
    target.create("B-1")

    response = tenant_data.prepare(new_migration(), source.tenant, target.tenant)
    assert (response.row_count, list(response.conflicts)) == (2, [])
    # A tenant without sites has nothing to copy.
    empty = tenant_data.prepare(new_migration(), third.tenant, target.tenant)
    assert (empty.row_count, list(empty.conflicts)) == (0, [])


# --- Apply ------------------------------------------------------------------------------------


async def test_apply_copies_every_site_into_the_target_and_leaves_the_source(tenant_data, tenants, admin):
    source, target = tenants
    located = source.create("M-1", name="Soweto Monopole", latitude=-26.26, longitude=27.86, region="gauteng")
    plain = source.create("M-2")
    own = target.create("OWN-1", region="gauteng")
    source_before = await site_rows(admin, source.tenant)

    assert tenant_data.apply(new_migration(), source.tenant, target.tenant) == 2

    for original in (located, plain):
        copied = target.get(original.site_id)
        assert copied.tenant_id == target.tenant
        expected = sites_pb.Site()
        expected.CopyFrom(original)
        expected.tenant_id = target.tenant
        assert copied == expected  # name, location, configuration and both timestamps
    assert target.ids() == ["M-1", "M-2", "OWN-1"]
    # region is generated from location: recomputed in the target, so the filter finds the copy.
    assert target.ids(region="gauteng") == ["M-1", "OWN-1"]
    assert target.get("OWN-1") == own
    assert source.ids() == ["M-1", "M-2"]
    assert await site_rows(admin, source.tenant) == source_before
    target_rows = await site_rows(admin, target.tenant)
    assert {k: v[1:] for k, v in target_rows.items() if k != "OWN-1"} == {k: v[1:] for k, v in source_before.items()}


async def test_repeated_apply_returns_the_same_count_and_copies_nothing_more(tenant_data, tenants, admin):
    source, target = tenants
    source.create("M-1")
    source.create("M-2")
    migration = new_migration()
    assert tenant_data.apply(migration, source.tenant, target.tenant) == 2
    # A site the source gains afterwards is not part of this migration any more.
    source.create("M-3")

    assert tenant_data.apply(migration, source.tenant, target.tenant) == 2
    assert tenant_data.apply(migration, source.tenant, target.tenant) == 2

    assert target.ids() == ["M-1", "M-2"]
    assert await row_counts(admin, target.tenant) == {
        "sites": 2,
        "create_requests": 0,
        "tenant_migrations": 1,
        "tenant_migration_rows": 2,
    }


async def test_concurrent_applies_copy_exactly_once(tenant_data: TenantData, tenants, admin):
    source, target = tenants
    site_ids = [f"C-{i:03d}" for i in range(40)]
    await insert_sites(admin, source.tenant, site_ids)
    migration = new_migration()
    start = threading.Barrier(5)

    def apply() -> int:
        start.wait(10)
        return tenant_data.apply(migration, source.tenant, target.tenant)

    with ThreadPoolExecutor(max_workers=5) as pool:
        counts = list(pool.map(lambda _: apply(), range(5)))

    assert counts == [40] * 5
    assert sorted(await site_rows(admin, target.tenant)) == site_ids
    assert await row_counts(admin, target.tenant) == {
        "sites": 40,
        "create_requests": 0,
        "tenant_migrations": 1,
        "tenant_migration_rows": 40,
    }


async def test_conflict_fails_naming_the_ids_and_leaves_the_target_unchanged(tenant_data, tenants, admin):
    source, target = tenants
    for site_id in ("A-1", "SHARED-1", "SHARED-2"):
        source.create(site_id)
    for site_id in ("B-1", "SHARED-2", "SHARED-1"):
        target.create(site_id)
    before = await site_rows(admin, target.tenant)
    migration = new_migration()
    request = pb.ApplyTenantMigrationRequest(
        migration_id=migration, source_tenant_id=source.tenant, target_tenant_id=target.tenant, data_type="sites"
    )

    err = tenant_data.fails("ApplyTenantMigration", request, grpc.StatusCode.FAILED_PRECONDITION, "MIGRATION_CONFLICT")

    assert err.info is not None
    assert err.info.metadata["conflicts"] == "SHARED-1,SHARED-2"
    assert err.info.metadata["conflict_count"] == "2"
    assert "SHARED-1" in err.message
    assert await site_rows(admin, target.tenant) == before
    assert target.get("SHARED-1").name == f"{target.tenant} SHARED-1"  # not overwritten by the source's
    assert (await row_counts(admin, target.tenant))["tenant_migration_rows"] == 0
    assert (await row_counts(admin, target.tenant))["tenant_migrations"] == 0
    # Once the target has given the ids up, the same migration goes through.
    await admin.execute("DELETE FROM sites.sites WHERE tenant_id = $1 AND site_id LIKE 'SHARED-%'", target.tenant)
    assert tenant_data.apply(migration, source.tenant, target.tenant) == 3


async def test_many_conflicts_are_counted_and_listed_within_bounds(tenant_data, tenants, admin):
    source, target = tenants
    shared = [f"SHARED-SITE-WITH-A-LONG-IDENTIFIER-{i:04d}" for i in range(300)]
    await insert_sites(admin, source.tenant, [*shared, "ONLY-IN-SOURCE"])
    await insert_sites(admin, target.tenant, shared)
    request = pb.ApplyTenantMigrationRequest(
        migration_id=new_migration(), source_tenant_id=source.tenant, target_tenant_id=target.tenant, data_type="sites"
    )

    err = tenant_data.fails("ApplyTenantMigration", request, grpc.StatusCode.FAILED_PRECONDITION, "MIGRATION_CONFLICT")

    assert err.info is not None
    assert err.info.metadata["conflict_count"] == "300"
    listed = err.info.metadata["conflicts"].split(",")
    assert 0 < len(listed) < 300  # truncated, so the error stays small enough for any client
    assert len(err.info.metadata["conflicts"]) <= 1000
    assert listed == shared[: len(listed)]
    assert "ONLY-IN-SOURCE" not in await site_rows(admin, target.tenant)
    # Prepare lists them all (up to its cap of 1000).
    assert list(tenant_data.prepare(new_migration(), source.tenant, target.tenant).conflicts) == shared


async def test_reusing_a_migration_id_for_another_source_is_refused(tenant_data, tenants, third, admin):
    source, target = tenants
    source.create("A-1")
    third.create("C-1")
    migration = new_migration()
    assert tenant_data.apply(migration, source.tenant, target.tenant) == 1
    request = pb.ApplyTenantMigrationRequest(
        migration_id=migration, source_tenant_id=third.tenant, target_tenant_id=target.tenant, data_type="sites"
    )

    err = tenant_data.fails("ApplyTenantMigration", request, grpc.StatusCode.FAILED_PRECONDITION, "MIGRATION_ID_REUSED")

    assert err.info is not None and err.info.metadata["source_tenant_id"] == source.tenant
    assert target.ids() == ["A-1"]


async def test_a_failure_before_commit_leaves_nothing_and_a_retry_copies(extra_sites, service_token, tenants, admin):
    """The copy and its records are one transaction: a crash half-way writes nothing."""
    source, target = tenants
    source.create("M-1")
    source.create("M-2")
    faulty = extra_sites({"FAULT_POINTS": "tenant_data.apply.before_commit:1"})
    with grpc.insecure_channel(faulty.target) as channel:
        tenant_data = TenantData(pb_grpc.TenantDataServiceStub(channel), bearer(service_token(service="tenant")))
        migration = new_migration()
        request = pb.ApplyTenantMigrationRequest(
            migration_id=migration, source_tenant_id=source.tenant, target_tenant_id=target.tenant, data_type="sites"
        )
        err = expect_error(tenant_data.stub.ApplyTenantMigration, request, metadata=tenant_data.md)
        assert err.code == grpc.StatusCode.INTERNAL, err
        assert await row_counts(admin, target.tenant) == dict.fromkeys(TABLES, 0)

        assert tenant_data.apply(migration, source.tenant, target.tenant) == 2
    assert target.ids() == ["M-1", "M-2"]


# --- Undo -------------------------------------------------------------------------------------


async def test_undo_removes_exactly_the_migrated_rows(tenant_data, tenants, admin):
    source, target = tenants
    source.create("M-1")
    source.create("M-2")
    target.create("OWN-1")
    migration = new_migration()
    assert tenant_data.apply(migration, source.tenant, target.tenant) == 2
    assert await tracked_keys(admin, target.tenant) == [(migration, "sites", ["M-1"]), (migration, "sites", ["M-2"])]
    target.create("OWN-2")  # created by the target itself after the migration
    source_before = await site_rows(admin, source.tenant)

    assert tenant_data.undo(migration, target.tenant) == 2

    assert target.ids() == ["OWN-1", "OWN-2"]
    assert await site_rows(admin, source.tenant) == source_before
    assert await tracked_keys(admin, target.tenant) == []
    assert (await row_counts(admin, target.tenant))["tenant_migrations"] == 0
    # Again: nothing left to remove, and still a success.
    assert tenant_data.undo(migration, target.tenant) == 0
    assert target.ids() == ["OWN-1", "OWN-2"]
    # Undone means forgotten: the same migration can copy again.
    assert tenant_data.apply(migration, source.tenant, target.tenant) == 2
    assert target.ids() == ["M-1", "M-2", "OWN-1", "OWN-2"]


async def test_undo_of_a_migration_that_wrote_nothing_removes_nothing(tenant_data, tenants, admin):
    source, target = tenants
    source.create("M-1")
    target.create("M-0")
    applied = new_migration()
    assert tenant_data.apply(applied, source.tenant, target.tenant) == 1
    before = await site_rows(admin, target.tenant)

    assert tenant_data.undo(new_migration(), target.tenant) == 0
    # Undo acts in the tenant the migration wrote into, and nowhere else.
    assert tenant_data.undo(applied, source.tenant) == 0

    assert await site_rows(admin, target.tenant) == before
    assert sorted(before) == ["M-0", "M-1"]
    assert source.ids() == ["M-1"]


# --- Purge ------------------------------------------------------------------------------------


async def test_purge_deletes_every_row_of_the_tenant_and_nothing_else(tenant_data, tenants, third, admin):
    doomed, other = tenants
    doomed.create("D-1", request_id="req-1")
    doomed.create("D-2", request_id="req-2")
    third.create("C-1")
    other.create("O-1", request_id="req-1")
    # The doomed tenant both received a migration and was the source of one.
    assert tenant_data.apply(new_migration(), third.tenant, doomed.tenant) == 1
    assert tenant_data.apply(new_migration(), doomed.tenant, other.tenant) == 3
    counts = await row_counts(admin, doomed.tenant)
    assert counts == {"sites": 3, "create_requests": 2, "tenant_migrations": 1, "tenant_migration_rows": 1}
    untouched = {
        t.tenant: (await site_rows(admin, t.tenant), await row_counts(admin, t.tenant)) for t in (other, third)
    }

    assert tenant_data.purge(doomed.tenant) == sum(counts.values())

    assert await row_counts(admin, doomed.tenant) == dict.fromkeys(TABLES, 0)
    assert {
        t.tenant: (await site_rows(admin, t.tenant), await row_counts(admin, t.tenant)) for t in (other, third)
    } == untouched
    assert tenant_data.purge(doomed.tenant) == 0


async def test_sites_spec_covers_every_table_and_column_of_the_schema(admin):
    assert await spec_problems(admin, SITES_TENANT_DATA) == []
    # The feature gate's purge leaves nothing of a tenant behind either.
    assert await spec_problems(admin, FEATURES_TENANT_DATA) == []
    # The check itself can fail: a spec that forgets a table and a column is caught.
    careless = TenantDataSpec(
        schema="sites",
        copies={"sites": CopySpec(table="sites", key=("site_id",), columns=("name", "location", "region"))},
        purge_tables=("sites",),
    )
    assert sorted(await spec_problems(admin, careless)) == [
        "sites.create_requests is not in purge_tables: a purge would leave its rows behind",
        "sites: sites.sites.configuration is not copied",
        "sites: sites.sites.create_time is not copied",
        "sites: sites.sites.region is generated and cannot be copied",
        "sites: sites.sites.update_time is not copied",
    ]


# --- Access and arguments ---------------------------------------------------------------------


def requests_for(source: str, target: str) -> dict[str, Any]:
    migration = new_migration()
    return {
        "PrepareTenantMigration": pb.PrepareTenantMigrationRequest(
            migration_id=migration, source_tenant_id=source, target_tenant_id=target, data_type="sites"
        ),
        "ApplyTenantMigration": pb.ApplyTenantMigrationRequest(
            migration_id=migration, source_tenant_id=source, target_tenant_id=target, data_type="sites"
        ),
        "UndoTenantMigration": pb.UndoTenantMigrationRequest(
            migration_id=migration, target_tenant_id=target, data_type="sites"
        ),
        "PurgeTenantData": pb.PurgeTenantDataRequest(tenant_id=source),
    }


@pytest.mark.parametrize("who", ["tenant_admin", "platform_admin"])
async def test_end_user_tokens_are_refused(who, tenant_data, tenants, token, admin):
    source, target = tenants
    source.create("A-1")
    user_token = token(source.tenant) if who == "tenant_admin" else token("platform", role="platform_admin")
    before = {t.tenant: await row_counts(admin, t.tenant) for t in tenants}

    for method, request in requests_for(source.tenant, target.tenant).items():
        err = tenant_data.fails(
            method, request, grpc.StatusCode.PERMISSION_DENIED, "SERVICE_IDENTITY_REQUIRED", md=bearer(user_token)
        )
        assert "internal" in err.message, (method, err)

    assert {t.tenant: await row_counts(admin, t.tenant) for t in tenants} == before
    assert before[source.tenant]["sites"] == 1


def test_calls_without_a_token_are_unauthenticated(tenant_data, tenant_pair):
    for method, request in requests_for(*tenant_pair).items():
        tenant_data.fails(method, request, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING", md=())


BAD_ARGUMENTS = [
    ("ApplyTenantMigration", {"data_type": "settings"}, "data_type", "sites"),
    ("PrepareTenantMigration", {"data_type": ""}, "data_type", "required"),
    ("ApplyTenantMigration", {"migration_id": ""}, "migration_id", "required"),
    ("PrepareTenantMigration", {"migration_id": "no spaces allowed"}, "migration_id", "must match"),
    ("ApplyTenantMigration", {"source_tenant_id": "Not A Tenant"}, "source_tenant_id", "must match"),
    ("PrepareTenantMigration", {"target_tenant_id": ""}, "target_tenant_id", "required"),
    ("ApplyTenantMigration", {"target_tenant_id": "ta_source"}, "target_tenant_id", "differ"),
    ("UndoTenantMigration", {"data_type": "settings"}, "data_type", "sites"),
    ("UndoTenantMigration", {"target_tenant_id": "x"}, "target_tenant_id", "must match"),
    ("UndoTenantMigration", {"migration_id": ""}, "migration_id", "required"),
    ("PurgeTenantData", {"tenant_id": ""}, "tenant_id", "required"),
    ("PurgeTenantData", {"tenant_id": "../other"}, "tenant_id", "must match"),
]


@pytest.mark.parametrize(("method", "change", "field", "says"), BAD_ARGUMENTS)
def test_bad_arguments_are_refused_naming_the_field(tenant_data, method, change, field, says):
    request = requests_for("ta_source", "tb_target")[method]
    for name, value in change.items():
        setattr(request, name, value)

    err = tenant_data.fails(method, request, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")

    assert err.fields == [field], err
    assert err.bad_request is not None
    assert says in err.bad_request.field_violations[0].description, err
