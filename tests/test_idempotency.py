"""Idempotent creates (services/runtime/idempotency.py), without a server.

A request hash is stored beside what a create made and compared on every retry, so it
must not change from one release to the next: the digests pinned here were computed by
the three hash functions the module replaced.
"""

from __future__ import annotations

import grpc
import pytest
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb

from services.runtime import idempotency
from services.runtime.errors import ServiceError
from services.runtime.validation import Violations
from services.sites.servicer import CREATE_IGNORES as SITE_IGNORES
from services.tenant.servicer import CREATE_IGNORES as TENANT_IGNORES

TENANT = tenant_pb.CreateTenantRequest(
    tenant_id="tenant_c",
    request_id="onboard-c-1",
    tenant=tenant_pb.Tenant(
        display_name="Coastal Towers",
        plan="basic",
        admin_email="noc@coastal.example",
        domains=["towers.coastal.example"],
    ),
)
SITE = sites_pb.CreateSiteRequest(
    site_id="TWR-A-0100",
    request_id="0b7c-1",
    site=sites_pb.Site(
        name="Soweto Monopole",
        location=sites_pb.Location(latitude=-26.26, longitude=27.86, region="gauteng", country_code="ZA"),
    ),
)
MIGRATION = tenant_pb.MigrateTenantDataRequest(
    source_tenant_id="tenant_a", target_tenant_id="tenant_b", data_types=["sites"], request_id="move-1"
)


def test_request_hashes_are_those_stored_by_earlier_releases():
    assert idempotency.request_hash(TENANT, TENANT_IGNORES) == (
        "7130600fb0224156000d7776b8fd56a111eb9b58ee39285c4d39ca8f5ec2e7e0"
    )
    assert idempotency.request_hash(SITE, SITE_IGNORES) == (
        "cb09f6ddd2b5b8e656f6329333997369f25a352688fffc54f6f51826aca3ae15"
    )
    assert idempotency.request_hash(MIGRATION) == "cccc6c938db30f6a3de6f47935ec4b41b8eea02a45bf02c8e0bf03f0887c8041"


def test_a_retry_that_differs_only_in_its_request_id_or_ignored_fields_hashes_alike():
    retry = sites_pb.CreateSiteRequest()
    retry.CopyFrom(SITE)
    retry.request_id = "another"
    retry.site.tenant_id = "tenant_z"
    retry.site.create_time.seconds = 1
    assert idempotency.request_hash(retry, SITE_IGNORES) == idempotency.request_hash(SITE, SITE_IGNORES)


def test_a_request_that_differs_in_a_field_the_create_reads_hashes_differently():
    other = sites_pb.CreateSiteRequest()
    other.CopyFrom(SITE)
    other.site.name = "Soweto Lattice"
    assert idempotency.request_hash(other, SITE_IGNORES) != idempotency.request_hash(SITE, SITE_IGNORES)


def test_a_request_id_reused_on_another_request_is_invalid_argument_request_id_reused():
    idempotency.check_same_request("a" * 64, "a" * 64, "create request")  # the same request: replayed
    with pytest.raises(ServiceError) as caught:
        idempotency.check_same_request("a" * 64, "b" * 64, "migration")
    error = caught.value
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED")
    (violation,) = error.violations
    assert violation.field == "request_id"
    assert "different migration" in violation.description and "use a new request_id" in violation.description


@pytest.mark.parametrize(
    ("value", "refused"),
    [("", False), ("0b7c-1", False), ("a" * 64, False), ("a" * 65, True), ("a b", True), ("é", True)],
)
def test_a_request_id_is_optional_and_follows_the_rule(value, refused):
    v = Violations()
    idempotency.check_request_id(v, value)
    assert [item.field for item in v.items] == (["request_id"] if refused else [])
