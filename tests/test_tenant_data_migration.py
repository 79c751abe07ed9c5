"""MigrateTenantData end to end: the registry drives the sites service and its own settings part.

Sites are arranged through the public SiteService with each tenant's own token; what the
target holds afterwards is read both through the API (as that tenant) and in PostgreSQL
as the superuser, so a row the API would hide still counts.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.tenant.v1 import tenant_registry_service_pb2 as pb
from towerco.tenant.v1 import tenant_registry_service_pb2_grpc as pb_grpc

from services.tenant import tenant_settings_store
from services.tenant.secrets import MASK, load_secret_box

from .support import bearer, expect_error
from .support.metadata import Metadata

Migration = pb.Migration
TERMINAL = (Migration.STATE_SUCCEEDED, Migration.STATE_FAILED, Migration.STATE_ROLLED_BACK)


def migrate_request(source: str, target: str, *data_types: str, request_id: str = "") -> pb.MigrateTenantDataRequest:
    return pb.MigrateTenantDataRequest(
        source_tenant_id=source, target_tenant_id=target, data_types=list(data_types), request_id=request_id
    )


def finished(registry: Any, platform_token: str, migration_id: str, eventually: Any) -> pb.Migration:
    def done() -> pb.Migration:
        migration: pb.Migration = registry.GetMigration(
            pb.GetMigrationRequest(migration_id=migration_id), metadata=bearer(platform_token), timeout=10
        )
        assert migration.state in TERMINAL, migration
        return migration

    result: pb.Migration = eventually(done, within=20, interval=0.1)
    return result


def create_sites(sites: Any, md: Metadata, *site_ids: str, name: str = "") -> None:
    for site_id in site_ids:
        sites.CreateSite(
            sites_pb.CreateSiteRequest(site_id=site_id, site=sites_pb.Site(name=name or f"Site {site_id}")),
            metadata=md,
            timeout=10,
        )


def site_names(sites: Any, md: Metadata) -> dict[str, str]:
    reply = sites.ListSites(sites_pb.ListSitesRequest(page_size=100), metadata=md, timeout=10)
    return {site.site_id: site.name for site in reply.sites}


async def db_sites(admin: Any, tenant_id: str) -> dict[str, str]:
    rows = await admin.fetch("SELECT site_id, name FROM sites.sites WHERE tenant_id = $1", tenant_id)
    return {row["site_id"]: row["name"] for row in rows}


async def db_settings(admin: Any, tenant_id: str) -> dict[str, Any]:
    raw = await admin.fetchval("SELECT document::text FROM tenant.tenant_settings WHERE tenant_id = $1", tenant_id)
    document: dict[str, Any] = json.loads(raw)
    return document


def brand(registry: Any, md: Metadata, company_name: str, api_key: str) -> pb.TenantSettings:
    request = pb.UpdateTenantSettingsRequest(
        settings=pb.TenantSettings(
            branding=pb.Branding(company_name=company_name, primary_color="#101010"),
            integrations=pb.Integrations(api_keys={"pagerduty": api_key}),
        )
    )
    request.update_mask.paths.extend(["branding", "integrations.api_keys"])
    settings: pb.TenantSettings = registry.UpdateTenantSettings(request, metadata=md, timeout=10)
    return settings


@pytest.fixture
def pair_md(token, tenant_pair) -> tuple[str, str, Metadata, Metadata]:
    source, target = tenant_pair
    return source, target, bearer(token(source)), bearer(token(target))


@dataclass(frozen=True)
class Merged:
    """A migration of a source tenant's sites and settings into a target with a site of its own."""

    source: str
    target: str
    source_md: Metadata
    target_md: Metadata
    api_key: str  # a secret in the source's settings
    source_settings: pb.TenantSettings
    source_sites: dict[str, str]  # the source in PostgreSQL before the migration
    source_document: dict[str, Any]
    started: pb.Migration
    done: pb.Migration


@pytest.fixture(scope="module")
def merged(registry, sites, platform_token, token, admin_dsn, eventually) -> Merged:
    """Migrated once for the tests of what a migration does (each looks at one part)."""
    suffix = uuid.uuid4().hex[:10]
    source, target = f"ta_{suffix}", f"tb_{suffix}"
    source_md, target_md = bearer(token(source)), bearer(token(target))
    api_key = f"sk-{uuid.uuid4().hex}"
    create_sites(sites, source_md, "MIG-1", "MIG-2")
    create_sites(sites, target_md, "OWN-1")
    source_settings = brand(registry, source_md, "Absorbed Co", api_key)

    async def source_now() -> tuple[dict[str, str], dict[str, Any]]:
        admin = await asyncpg.connect(admin_dsn)
        try:
            return await db_sites(admin, source), await db_settings(admin, source)
        finally:
            await admin.close()

    source_sites, source_document = asyncio.run(source_now())
    started = registry.MigrateTenantData(
        migrate_request(source, target, "sites", "settings", request_id=f"merge-{source}"),
        metadata=bearer(platform_token),
        timeout=10,
    )
    done = finished(registry, platform_token, started.migration_id, eventually)
    return Merged(
        source, target, source_md, target_md, api_key, source_settings, source_sites, source_document, started, done
    )


def test_a_migration_starts_pending_with_an_id_and_what_it_was_asked(merged):
    started = merged.started
    assert started.state == Migration.STATE_PENDING
    assert str(uuid.UUID(started.migration_id)) == started.migration_id
    assert (started.source_tenant_id, started.target_tenant_id) == (merged.source, merged.target)
    assert list(started.data_types) == ["sites", "settings"]


def test_a_migration_of_sites_and_settings_succeeds(merged):
    assert merged.done.state == Migration.STATE_SUCCEEDED, merged.done
    assert merged.done.error == ""


def test_the_targets_users_see_the_sources_sites_next_to_their_own(sites, merged):
    assert site_names(sites, merged.target_md) == {
        "OWN-1": "Site OWN-1",
        "MIG-1": "Site MIG-1",
        "MIG-2": "Site MIG-2",
    }
    got = sites.GetSite(sites_pb.GetSiteRequest(site_id="MIG-2"), metadata=merged.target_md, timeout=10)
    assert got.name == "Site MIG-2"


def test_the_settings_come_along_with_the_secret_still_masked(registry, merged):
    copied = registry.GetTenantSettings(pb.GetTenantSettingsRequest(), metadata=merged.target_md, timeout=10)
    assert copied.branding == merged.source_settings.branding
    assert dict(copied.integrations.api_keys) == {"pagerduty": MASK}


async def test_the_secret_is_resealed_for_the_target_and_still_usable(admin, stack, merged):
    box = load_secret_box({}, stack.keys_dir / "settings-encryption.keys")
    target_document = await db_settings(admin, merged.target)
    assert merged.api_key not in json.dumps(target_document)
    assert tenant_settings_store.reveal_secret(target_document, box, merged.target, "api_keys.pagerduty") == (
        merged.api_key
    )


async def test_the_source_is_left_as_it_was(admin, sites, merged):
    assert await db_sites(admin, merged.source) == merged.source_sites
    assert await db_settings(admin, merged.source) == merged.source_document
    assert site_names(sites, merged.source_md) == {"MIG-1": "Site MIG-1", "MIG-2": "Site MIG-2"}


async def test_a_site_id_in_both_tenants_fails_the_migration_before_anything_is_written(
    registry, sites, platform_token, pair_md, admin, eventually
):
    source, target, source_md, target_md = pair_md
    create_sites(sites, source_md, "SRC-1", "DUP-7")
    create_sites(sites, target_md, "DUP-7", name="The target's own")
    brand(registry, source_md, "Would Overwrite", f"sk-{uuid.uuid4().hex}")
    target_sites, target_document = await db_sites(admin, target), await db_settings(admin, target)

    started = registry.MigrateTenantData(
        migrate_request(source, target, "sites", "settings"), metadata=bearer(platform_token), timeout=10
    )
    done = finished(registry, platform_token, started.migration_id, eventually)
    assert done.state == Migration.STATE_FAILED, done
    assert "DUP-7" in done.error
    assert "SRC-1" not in done.error

    assert await db_sites(admin, target) == target_sites == {"DUP-7": "The target's own"}
    assert await db_settings(admin, target) == target_document
    assert await admin.fetchval("SELECT count(*) FROM sites.tenant_migration_rows WHERE tenant_id = $1", target) == 0


@pytest.mark.parametrize(
    ("data_types", "fault"),
    [(["sites", "settings"], "migration.settings"), (["settings", "sites"], "migration.sites")],
    ids=["settings-fails-after-sites", "sites-fails-after-settings"],
)
async def test_a_failure_in_the_second_part_rolls_back_the_first(
    registry, sites, platform_token, pair_md, admin, extra_service, eventually, data_types, fault
):
    source, target, source_md, target_md = pair_md
    faulty = extra_service("tenant", {"FAULT_POINTS": fault})
    create_sites(sites, source_md, "RB-1", "RB-2", "RB-3")
    create_sites(sites, target_md, "KEEP-1")
    brand(registry, source_md, "Never Lands", f"sk-{uuid.uuid4().hex}")
    target_sites, target_document = await db_sites(admin, target), await db_settings(admin, target)
    target_settings = registry.GetTenantSettings(pb.GetTenantSettingsRequest(), metadata=target_md, timeout=10)

    with grpc.insecure_channel(faulty.target) as channel:
        started = pb_grpc.TenantRegistryServiceStub(channel).MigrateTenantData(
            migrate_request(source, target, *data_types), metadata=bearer(platform_token), timeout=10
        )
    done = finished(registry, platform_token, started.migration_id, eventually)
    assert done.state == Migration.STATE_ROLLED_BACK, done
    assert fault.split(".")[1] in done.error

    left = await admin.fetch(
        "SELECT site_id FROM sites.sites WHERE tenant_id = $1 AND site_id = ANY($2::text[])",
        target,
        ["RB-1", "RB-2", "RB-3"],
    )
    assert left == []
    assert await db_sites(admin, target) == target_sites == {"KEEP-1": "Site KEEP-1"}
    assert await db_settings(admin, target) == target_document
    assert await admin.fetchval("SELECT count(*) FROM sites.tenant_migration_rows WHERE tenant_id = $1", target) == 0
    assert registry.GetTenantSettings(pb.GetTenantSettingsRequest(), metadata=target_md, timeout=10) == target_settings
    assert site_names(sites, target_md) == {"KEEP-1": "Site KEEP-1"}
    assert len(site_names(sites, source_md)) == 3


def test_the_same_request_id_gives_the_same_migration(registry, platform_token, pair_md, admin, eventually):
    source, target, _, _ = pair_md
    request = migrate_request(source, target, "settings", request_id=f"once-{source}")
    md = bearer(platform_token)
    first = registry.MigrateTenantData(request, metadata=md, timeout=10)
    second = registry.MigrateTenantData(request, metadata=md, timeout=10)
    assert second.migration_id == first.migration_id
    assert second.create_time == first.create_time
    assert finished(registry, platform_token, first.migration_id, eventually).state == Migration.STATE_SUCCEEDED
    third = registry.MigrateTenantData(request, metadata=md, timeout=10)
    assert third.migration_id == first.migration_id
    assert third.state == Migration.STATE_SUCCEEDED

    other_body = migrate_request(source, target, "sites", request_id=request.request_id)
    error = expect_error(registry.MigrateTenantData, other_body, metadata=md)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED"), error
    assert error.fields == ["request_id"]


@pytest.mark.parametrize(
    ("source", "target", "data_types", "field"),
    [
        ("{a}", "{a}", ["sites"], "target_tenant_id"),
        ("{a}", "{b}", ["invoices"], "data_types[0]"),
        ("{a}", "{b}", ["sites", "sites"], "data_types[1]"),
        ("{a}", "{b}", ["settings", ""], "data_types[1]"),
        ("{a}", "{b}", [], "data_types"),
        ("{a}", "", ["sites"], "target_tenant_id"),
        ("platform", "{b}", ["settings"], "source_tenant_id"),
    ],
    ids=["same-tenant", "unknown-type", "duplicate-type", "empty-type", "no-types", "no-target", "platform"],
)
def test_bad_migration_requests_are_invalid_argument(
    registry, platform_token, pair_md, source, target, data_types, field
):
    a, b, _, _ = pair_md
    request = migrate_request(source.format(a=a, b=b), target.format(a=a, b=b), *data_types)
    error = expect_error(registry.MigrateTenantData, request, metadata=bearer(platform_token))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.fields == [field], error


def test_a_migration_with_a_missing_tenant_is_not_found(registry, platform_token, pair_md):
    source, _, _, _ = pair_md
    missing = f"none_{uuid.uuid4().hex[:10]}"
    error = expect_error(
        registry.MigrateTenantData, migrate_request(source, missing, "sites"), metadata=bearer(platform_token)
    )
    assert error.code == grpc.StatusCode.NOT_FOUND, error


@pytest.mark.parametrize("suspended", ["source", "target"])
async def test_a_suspended_tenant_cannot_take_part_in_a_migration(registry, platform_token, pair_md, admin, suspended):
    source, target, _, _ = pair_md
    victim = source if suspended == "source" else target
    registry.SuspendTenant(
        pb.SuspendTenantRequest(tenant_id=victim, reason="migration test"), metadata=bearer(platform_token), timeout=10
    )
    error = expect_error(
        registry.MigrateTenantData, migrate_request(source, target, "sites"), metadata=bearer(platform_token)
    )
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "TENANT_STATE_CONFLICT"), error
    count = await admin.fetchval(
        "SELECT count(*) FROM tenant.migrations WHERE source_tenant_id = $1 OR target_tenant_id = $1", victim
    )
    assert count == 0


@pytest.mark.parametrize(
    "permissions", [None, ["tenants.manage"]], ids=["tenant-admin", "tenant-admin-granted-tenants-manage"]
)
async def test_migrations_need_a_platform_admin(
    registry, token, platform_token, pair_md, admin, eventually, permissions
):
    source, target, _, _ = pair_md
    md = bearer(token(target, permissions=permissions))
    error = expect_error(registry.MigrateTenantData, migrate_request(source, target, "sites"), metadata=md)
    assert error.code == grpc.StatusCode.PERMISSION_DENIED, error
    count = await admin.fetchval("SELECT count(*) FROM tenant.migrations WHERE target_tenant_id = $1", target)
    assert count == 0

    started = registry.MigrateTenantData(
        migrate_request(source, target, "settings"), metadata=bearer(platform_token), timeout=10
    )
    error = expect_error(registry.GetMigration, pb.GetMigrationRequest(migration_id=started.migration_id), metadata=md)
    assert error.code == grpc.StatusCode.PERMISSION_DENIED, error
    assert finished(registry, platform_token, started.migration_id, eventually).state == Migration.STATE_SUCCEEDED


@pytest.mark.parametrize(
    ("migration_id", "code"),
    [(str(uuid.uuid4()), grpc.StatusCode.NOT_FOUND), ("not-a-uuid", grpc.StatusCode.INVALID_ARGUMENT)],
    ids=["unknown", "malformed"],
)
def test_get_migration_of_no_migration(registry, platform_token, migration_id, code):
    error = expect_error(
        registry.GetMigration, pb.GetMigrationRequest(migration_id=migration_id), metadata=bearer(platform_token)
    )
    assert error.code == code, error


# --- Several registry replicas: a migration has one runner at a time -------------------


async def unfinished_migration(admin: Any, source: str, target: str, lease_seconds: float) -> str:
    """A migration another replica left RUNNING, its lease ending ``lease_seconds`` from now."""
    migration_id = uuid.uuid4()
    await admin.execute(
        """INSERT INTO tenant.migrations (tenant_id, migration_id, source_tenant_id, target_tenant_id, data_types,
                                          state, lease_owner, lease_until)
           VALUES ('platform', $1, $2, $3, ARRAY['sites'], 'STATE_RUNNING', 'other-replica/1',
                   now() + make_interval(secs => $4))""",
        migration_id,
        source,
        target,
        lease_seconds,
    )
    return str(migration_id)


async def test_a_migration_another_replica_is_running_is_left_alone(pair_md, admin, extra_service):
    source, target, _, _ = pair_md
    migration_id = await unfinished_migration(admin, source, target, lease_seconds=120)
    extra_service("tenant")  # a new replica sweeps unfinished migrations as it starts
    await asyncio.sleep(1.0)
    row = await admin.fetchrow(
        "SELECT state, lease_owner FROM tenant.migrations WHERE tenant_id = 'platform' AND migration_id = $1",
        uuid.UUID(migration_id),
    )
    assert (row["state"], row["lease_owner"]) == ("STATE_RUNNING", "other-replica/1")
    await admin.execute(
        "UPDATE tenant.migrations SET state = 'STATE_FAILED', lease_until = NULL WHERE migration_id = $1",
        uuid.UUID(migration_id),
    )


async def test_a_migration_whose_runner_died_is_taken_over_and_finished(
    registry, sites, platform_token, pair_md, admin, extra_service, eventually
):
    source, target, source_md, target_md = pair_md
    create_sites(sites, source_md, "TAKE-1", "TAKE-2")
    migration_id = await unfinished_migration(admin, source, target, lease_seconds=-1)
    extra_service("tenant")
    done = finished(registry, platform_token, migration_id, eventually)
    assert done.state == Migration.STATE_SUCCEEDED, done
    assert set(site_names(sites, target_md)) >= {"TAKE-1", "TAKE-2"}
    row = await admin.fetchrow(
        "SELECT lease_owner, lease_until FROM tenant.migrations WHERE migration_id = $1", uuid.UUID(migration_id)
    )
    assert row["lease_owner"] != "other-replica/1"  # a live replica claimed it
    assert row["lease_until"] is None  # and let go once it finished
