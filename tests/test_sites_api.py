"""SiteService over real gRPC: CRUD, update masks, pagination, validation, idempotency, isolation.

Every call goes through the running sites service (interceptor chain, PostgreSQL with RLS).
Each test works in its own fresh tenants (``tenant_pair``), so tests never see each other's rows.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, json_format, timestamp_pb2
from google.rpc import error_details_pb2
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as pb_grpc

from .support import RichError, bearer, expect_error, rich_error

DOMAIN = "towerco.sites.v1.SiteService"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
SITE_ID_RULE = "^[A-Za-z0-9][A-Za-z0-9._-]{0,49}$"


Metadata = tuple[tuple[str, str | bytes], ...]


def metadata(token: str, tenant: str | None = None) -> Metadata:
    return tuple(bearer(token, tenant))


@dataclass
class Api:
    """One tenant's view of SiteService: the shared stub plus that tenant's bearer token."""

    stub: pb_grpc.SiteServiceStub
    tenant: str
    md: Metadata

    def create(self, site_id: str, /, request_id: str = "", **fields: Any) -> pb.Site:
        """CreateSite; ``fields`` are the Site's (so ``site_id=`` here sets the ignored ``site.site_id``)."""
        request = pb.CreateSiteRequest(site_id=site_id, site=site(**fields), request_id=request_id)
        return self.stub.CreateSite(request, metadata=self.md, timeout=10)

    def get(self, site_id: str) -> pb.Site:
        return self.stub.GetSite(pb.GetSiteRequest(site_id=site_id), metadata=self.md, timeout=10)

    def update(self, new: pb.Site, *paths: str) -> pb.Site:
        request = pb.UpdateSiteRequest(site=new, update_mask=field_mask_pb2.FieldMask(paths=list(paths)))
        return self.stub.UpdateSite(request, metadata=self.md, timeout=10)

    def delete(self, site_id: str) -> None:
        self.stub.DeleteSite(pb.DeleteSiteRequest(site_id=site_id), metadata=self.md, timeout=10)

    def page(self, page_size: int = 0, page_token: str = "", region: str = "") -> pb.ListSitesResponse:
        request = pb.ListSitesRequest(page_size=page_size, page_token=page_token, region=region)
        return self.stub.ListSites(request, metadata=self.md, timeout=10)

    def pages(self, page_size: int, region: str = "") -> list[pb.ListSitesResponse]:
        """Every page of a listing, following next_page_token to the end."""
        pages = [self.page(page_size, region=region)]
        while pages[-1].next_page_token:
            assert len(pages) < 100, "pagination does not terminate"
            pages.append(self.page(page_size, pages[-1].next_page_token, region))
        return pages

    def ids(self, region: str = "") -> list[str]:
        return [s.site_id for p in self.pages(500, region) for s in p.sites]

    def analytics(self) -> pb.SiteAnalytics:
        return self.stub.GetSiteAnalytics(pb.GetSiteAnalyticsRequest(), metadata=self.md, timeout=10)

    def fails(
        self,
        method: str,
        request: Any,
        code: grpc.StatusCode,
        reason: str,
        fields: list[str] | None = None,
    ) -> RichError:
        """Call ``method``, which must fail with exactly this code, reason and violations."""
        return fails(getattr(self.stub, method), request, self.md, code, reason, fields)


def fails(
    fn: Callable[..., Any],
    request: Any,
    md: Metadata,
    code: grpc.StatusCode,
    reason: str,
    fields: list[str] | None = None,
) -> RichError:
    err = expect_error(fn, request, metadata=md)
    assert err.code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), err
    assert err.code == code, err
    assert err.info is not None, err
    assert err.reason == reason, err
    assert info(err).domain == DOMAIN, err
    if fields is not None:
        assert sorted(err.fields) == sorted(fields), err
        assert all(descriptions(err)), err
    return err


def info(err: RichError) -> error_details_pb2.ErrorInfo:
    assert err.info is not None, err
    return err.info


def descriptions(err: RichError) -> list[str]:
    assert err.bad_request is not None, err
    return [v.description for v in err.bad_request.field_violations]


def site(
    name: str = "",
    *,
    location: pb.Location | dict[str, Any] | None = None,
    configuration: dict[str, Any] | None = None,
    **other: Any,
) -> pb.Site:
    message = pb.Site(name=name, **other)
    if location is not None:
        message.location.CopyFrom(location if isinstance(location, pb.Location) else pb.Location(**location))
    if configuration is not None:
        message.configuration.update(configuration)
    return message


def config_of(message: pb.Site) -> dict[str, Any]:
    return json_format.MessageToDict(message.configuration)


def is_empty(api: Api) -> bool:
    return api.ids() == [] and api.analytics().total_sites == 0


@pytest.fixture
def apis(sites: pb_grpc.SiteServiceStub, token: Callable[..., str], tenant_pair: tuple[str, str]) -> tuple[Api, Api]:
    a, b = tenant_pair
    return Api(sites, a, metadata(token(a))), Api(sites, b, metadata(token(b)))


@pytest.fixture
def a(apis: tuple[Api, Api]) -> Api:
    return apis[0]


@pytest.fixture
def b(apis: tuple[Api, Api]) -> Api:
    return apis[1]


def create_many(api: Api, site_ids: list[str], region: Callable[[str], str] = lambda _: "") -> None:
    def one(site_id: str) -> None:
        api.create(site_id, name=f"Site {site_id}", location={"region": region(site_id)})

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, site_ids))


# --- CRUD -----------------------------------------------------------------------------------


FULL_LOCATION: dict[str, Any] = {
    "latitude": -26.2041,
    "longitude": 28.0473,
    "address": "1 Main Rd",
    "region": "gauteng",
    "country_code": "ZA",
}
FULL_CONFIG: dict[str, Any] = {
    "antennas": 3.0,
    "vendor": "acme",
    "bands": ["n78", "b3"],
    "power": {"backup": True, "kw": 12.5},
}


STALE = timestamp_pb2.Timestamp(seconds=978307200)  # 2001-01-01, must be ignored


@dataclass(frozen=True)
class CreatedSite:
    """One CreateSite by tenant a that also sends the output-only fields, naming tenant b."""

    a: Api
    b: Api
    created: pb.Site


@pytest.fixture(scope="module")
def created_site(sites: pb_grpc.SiteServiceStub, token: Callable[..., str]) -> CreatedSite:
    """Made once for the tests of what CreateSite stores and answers (each reads one part)."""
    suffix = uuid.uuid4().hex[:10]
    a, b = (Api(sites, tenant, metadata(token(tenant))) for tenant in (f"ta_{suffix}", f"tb_{suffix}"))
    created = a.create(
        "TWR-001",
        name="Tower One",
        location=FULL_LOCATION,
        configuration=FULL_CONFIG,
        site_id="ignored-id",
        tenant_id=b.tenant,
        create_time=STALE,
        update_time=STALE,
    )
    return CreatedSite(a, b, created)


def test_create_returns_the_site_with_the_fields_sent_under_the_id_of_the_request(created_site: CreatedSite) -> None:
    created = created_site.created
    assert created.site_id == "TWR-001"
    assert created.name == "Tower One"
    assert created.location == pb.Location(**FULL_LOCATION)
    assert config_of(created) == FULL_CONFIG


def test_create_puts_the_site_in_the_callers_tenant_not_the_one_sent(created_site: CreatedSite) -> None:
    assert created_site.created.tenant_id == created_site.a.tenant


def test_create_sets_both_times_to_now_ignoring_the_ones_sent(created_site: CreatedSite) -> None:
    created = created_site.created
    assert created.HasField("create_time") and created.HasField("update_time")
    assert created.create_time.seconds > STALE.seconds + 10 * 365 * 86400
    assert created.update_time == created.create_time


def test_a_created_site_reads_and_lists_back_as_create_answered(created_site: CreatedSite) -> None:
    a = created_site.a
    assert a.get("TWR-001") == created_site.created
    assert a.ids() == ["TWR-001"]


def test_a_tenant_id_sent_in_the_site_puts_nothing_in_that_tenant(created_site: CreatedSite) -> None:
    b = created_site.b
    # The client-supplied tenant_id did not put the site into tenant b.
    assert is_empty(b)
    b.fails("GetSite", pb.GetSiteRequest(site_id="TWR-001"), NOT_FOUND, "SITE_NOT_FOUND")


def test_a_site_id_sent_in_the_site_creates_no_site_of_that_id(created_site: CreatedSite) -> None:
    created_site.a.fails("GetSite", pb.GetSiteRequest(site_id="ignored-id"), NOT_FOUND, "SITE_NOT_FOUND")


def test_create_trims_name_and_site_without_location_has_none(a: Api) -> None:
    created = a.create("bare", name="  Bare site  ")
    assert created.name == "Bare site"
    assert not created.HasField("location")
    assert config_of(created) == {}
    assert a.get("bare") == created


def test_boundary_values_are_accepted_and_round_trip(a: Api) -> None:
    site_id = "A" + "b.c_d-" * 8 + "z"  # 50 characters
    assert len(site_id) == 50
    # {"k":"xxx..."} is 8 bytes of JSON around the value: exactly 16 KiB in all.
    config = {"k": "x" * (16 * 1024 - 8)}
    assert len(json.dumps(config, separators=(",", ":"))) == 16 * 1024
    location: dict[str, Any] = {
        "latitude": -90.0,
        "longitude": 180.0,
        "address": "a" * 500,
        "region": "r" * 100,
        "country_code": "KE",
    }
    created = a.create(site_id, request_id="r" * 64, name="n" * 100, location=location, configuration=config)
    assert created.name == "n" * 100
    assert created.location == pb.Location(**location)
    assert config_of(created) == config
    assert a.get(site_id) == created
    other = a.create("other", name="x", location={"latitude": 90, "longitude": -180})
    assert (other.location.latitude, other.location.longitude) == (90, -180)


def test_update_name_only_leaves_location_and_configuration(a: Api) -> None:
    created = a.create("s1", name="Old", location=FULL_LOCATION, configuration=FULL_CONFIG)
    # Values outside the mask are not read, even invalid ones.
    change = site("New", site_id="s1", location={"region": "elsewhere", "latitude": 500}, configuration={"x": 1})
    updated = a.update(change, "name")
    assert updated.name == "New"
    assert updated.location == created.location
    assert config_of(updated) == FULL_CONFIG
    assert updated.tenant_id == a.tenant
    assert updated.create_time == created.create_time
    assert updated.update_time.ToDatetime() > created.update_time.ToDatetime()
    assert a.get("s1") == updated


def test_update_location_region_path_changes_only_the_region(a: Api) -> None:
    a.create("s1", name="One", location=FULL_LOCATION, configuration=FULL_CONFIG)
    # The other location fields of the request are zero / empty: they must not be copied.
    updated = a.update(site("ignored", site_id="s1", location={"region": "limpopo"}), "location.region")
    assert updated.name == "One"
    expected = pb.Location(**FULL_LOCATION)
    expected.region = "limpopo"
    assert updated.location == expected
    assert config_of(updated) == FULL_CONFIG
    assert a.get("s1") == updated
    # The stored region column follows the update: filters and analytics see the new region.
    assert a.ids(region="limpopo") == ["s1"]
    assert a.ids(region="gauteng") == []
    assert dict(a.analytics().sites_by_region) == {"limpopo": 1}


def test_update_partial_location_of_site_without_location(a: Api) -> None:
    a.create("s1", name="One")
    updated = a.update(site(site_id="s1", location={"country_code": "NG", "region": "x"}), "location.country_code")
    assert updated.location == pb.Location(country_code="NG")
    assert a.get("s1").location == pb.Location(country_code="NG")


def test_update_whole_location_replaces_or_clears_it(a: Api) -> None:
    a.create("s1", name="One", location=FULL_LOCATION)
    replaced = a.update(site(site_id="s1", location={"region": "north"}), "location")
    assert replaced.location == pb.Location(region="north")
    cleared = a.update(site(site_id="s1"), "location")
    assert not cleared.HasField("location")
    assert not a.get("s1").HasField("location")
    assert dict(a.analytics().sites_by_region) == {"": 1}


def test_update_configuration_replaces_whole_object(a: Api) -> None:
    a.create("s1", name="One", location=FULL_LOCATION, configuration=FULL_CONFIG)
    updated = a.update(site("ignored", site_id="s1", configuration={"only": "this"}), "configuration")
    assert config_of(updated) == {"only": "this"}
    assert updated.name == "One"
    assert updated.location == pb.Location(**FULL_LOCATION)
    assert config_of(a.get("s1")) == {"only": "this"}


@pytest.mark.parametrize("paths", [[], ["*"]], ids=["empty-mask", "star-mask"])
def test_update_without_mask_replaces_all_updatable_fields(a: Api, paths: list[str]) -> None:
    created = a.create("s1", name="Old", location=FULL_LOCATION, configuration=FULL_CONFIG)
    updated = a.update(site("New", site_id="s1", location={"region": "r2"}, configuration={"v": 2}), *paths)
    assert updated.name == "New"
    assert updated.location == pb.Location(region="r2")
    assert config_of(updated) == {"v": 2}
    assert updated.create_time == created.create_time
    assert updated.update_time.ToDatetime() > created.update_time.ToDatetime()
    assert a.get("s1") == updated
    # All updatable fields includes location: absent in the request means cleared.
    cleared = a.update(site("Newer", site_id="s1"), *paths)
    assert not cleared.HasField("location")
    assert config_of(cleared) == {}
    assert cleared.name == "Newer"


def test_update_time_advances_on_every_update(a: Api) -> None:
    created = a.create("s1", name="v0")
    times = [created.update_time.ToDatetime()]
    for n in range(1, 4):
        times.append(a.update(site(f"v{n}", site_id="s1"), "name").update_time.ToDatetime())
    assert times == sorted(times) and len(set(times)) == len(times)
    assert a.get("s1").create_time == created.create_time


def test_update_missing_site_is_not_found(a: Api) -> None:
    request = pb.UpdateSiteRequest(site=site("x", site_id="nope"), update_mask=field_mask_pb2.FieldMask(paths=["name"]))
    err = a.fails("UpdateSite", request, NOT_FOUND, "SITE_NOT_FOUND")
    assert dict(info(err).metadata) == {"resource": "site", "name": "nope"}
    assert is_empty(a)


def test_delete_then_get_and_delete_again_are_not_found(a: Api) -> None:
    a.create("keep", name="Keep")
    a.create("gone", name="Gone")
    a.delete("gone")
    a.fails("GetSite", pb.GetSiteRequest(site_id="gone"), NOT_FOUND, "SITE_NOT_FOUND")
    a.fails("DeleteSite", pb.DeleteSiteRequest(site_id="gone"), NOT_FOUND, "SITE_NOT_FOUND")
    request = pb.UpdateSiteRequest(site=site("x", site_id="gone"), update_mask=field_mask_pb2.FieldMask(paths=["name"]))
    a.fails("UpdateSite", request, NOT_FOUND, "SITE_NOT_FOUND")
    assert a.ids() == ["keep"]
    assert a.analytics().total_sites == 1
    # The id is free again after a delete.
    assert a.create("gone", name="Again").name == "Again"


# --- Pagination -----------------------------------------------------------------------------


def test_pages_of_ten_over_twenty_five_sites(a: Api) -> None:
    expected = [f"site-{n:02d}" for n in range(25)]
    shuffled = expected[:]
    random.Random(7).shuffle(shuffled)  # creation order must not matter
    for site_id in shuffled:
        a.create(site_id, name=site_id)
    pages = a.pages(10)
    assert [len(p.sites) for p in pages] == [10, 10, 5]
    assert [bool(p.next_page_token) for p in pages] == [True, True, False]
    assert pages[0].next_page_token != pages[1].next_page_token
    listed = [s.site_id for p in pages for s in p.sites]
    assert listed == expected  # ordered by site_id, no duplicates, no gaps
    assert all(s.tenant_id == a.tenant for p in pages for s in p.sites)
    # The same token gives the same page again (stable).
    assert a.page(10, pages[0].next_page_token) == pages[1]


def test_page_size_zero_and_huge_on_a_small_tenant(a: Api) -> None:
    for n in range(25):
        a.create(f"s{n:02d}", name="x")
    for size in (0, 10000, 2**31 - 1):
        page = a.page(size)
        assert len(page.sites) == 25
        assert page.next_page_token == ""


def test_page_size_default_is_50_and_cap_is_500(a: Api) -> None:
    ids = [f"bulk-{n:04d}" for n in range(505)]
    create_many(a, ids)
    first = a.page(0)
    assert [s.site_id for s in first.sites] == ids[:50]
    assert first.next_page_token
    capped = a.page(10000)
    assert [s.site_id for s in capped.sites] == ids[:500]
    assert capped.next_page_token
    rest = a.page(10000, capped.next_page_token)
    assert [s.site_id for s in rest.sites] == ids[500:]
    assert rest.next_page_token == ""
    assert a.analytics().total_sites == 505


@pytest.mark.parametrize("size", [-1, -500, -(2**31)])
def test_negative_page_size_is_invalid(a: Api, size: int) -> None:
    a.create("s1", name="x")
    err = a.fails("ListSites", pb.ListSitesRequest(page_size=size), INVALID, "INVALID_ARGUMENT", ["page_size"])
    assert "page_size" in err.message


@pytest.mark.parametrize(
    "bad_token",
    ["garbage", "!!!!", "AAAA", "a" * 64, "x" * 2000, "ünïcødé", "eyJ0IjoiYSJ9"],
    ids=["word", "punctuation", "short-b64", "long-b64", "too-long", "non-ascii", "unsigned-json"],
)
def test_garbage_page_token_is_invalid(a: Api, bad_token: str) -> None:
    a.create("s1", name="x")
    request = pb.ListSitesRequest(page_size=10, page_token=bad_token)
    a.fails("ListSites", request, INVALID, "INVALID_PAGE_TOKEN", ["page_token"])


def _flip(token: str, index: int) -> str:
    replacement = "A" if token[index] != "A" else "B"
    return token[:index] + replacement + token[index + 1 :]


def test_tampered_page_token_is_refused(a: Api) -> None:
    for n in range(5):
        a.create(f"s{n}", name="x")
    token = a.page(2).next_page_token
    assert token
    # A flipped character in the signature, in the middle, and near the end (the position).
    for index in (3, len(token) // 2, len(token) - 3):
        tampered = _flip(token, index)
        assert tampered != token
        request = pb.ListSitesRequest(page_size=2, page_token=tampered)
        a.fails("ListSites", request, INVALID, "INVALID_PAGE_TOKEN", ["page_token"])
    truncated = pb.ListSitesRequest(page_size=2, page_token=token[:-4])
    a.fails("ListSites", truncated, INVALID, "INVALID_PAGE_TOKEN", ["page_token"])
    # The untouched token still works.
    assert [s.site_id for s in a.page(2, token).sites] == ["s2", "s3"]


def test_page_token_of_another_tenant_is_refused(a: Api, b: Api) -> None:
    for n in range(6):
        a.create(f"a{n}", name="a")
        b.create(f"b{n}", name="b")
    token_a = a.page(2).next_page_token
    assert token_a
    err = b.fails("ListSites", pb.ListSitesRequest(page_size=2, page_token=token_a), INVALID, "INVALID_PAGE_TOKEN")
    assert err.fields == ["page_token"]
    assert a.tenant not in err.message
    # b's own listing never contains a's rows; a's token still works for a.
    assert b.ids() == [f"b{n}" for n in range(6)]
    assert [s.site_id for s in a.page(2, token_a).sites] == ["a2", "a3"]


def test_page_token_is_bound_to_its_region_filter(a: Api) -> None:
    for n in range(6):
        a.create(f"s{n}", name="x", location={"region": "north"})
    token = a.page(2, region="north").next_page_token
    assert token
    for region in ("", "south", "North"):
        request = pb.ListSitesRequest(page_size=2, page_token=token, region=region)
        a.fails("ListSites", request, INVALID, "INVALID_PAGE_TOKEN", ["page_token"])
    unfiltered = a.page(2).next_page_token
    request = pb.ListSitesRequest(page_size=2, page_token=unfiltered, region="north")
    a.fails("ListSites", request, INVALID, "INVALID_PAGE_TOKEN", ["page_token"])
    assert [s.site_id for s in a.page(2, token, "north").sites] == ["s2", "s3"]


def test_region_filter_is_exact_and_paginates(a: Api) -> None:
    ids = [f"s{n:02d}" for n in range(20)]

    def region(site_id: str) -> str:
        return "north" if int(site_id[1:]) % 3 == 0 else "south"

    create_many(a, ids, region)
    a.create("nowhere", name="no location")
    north = [i for i in ids if region(i) == "north"]
    pages = a.pages(3, region="north")
    assert [len(p.sites) for p in pages] == [3, 3, 1]
    assert [s.site_id for p in pages for s in p.sites] == north
    assert all(s.location.region == "north" for p in pages for s in p.sites)
    assert a.ids(region="south") == [i for i in ids if region(i) == "south"]
    assert a.ids(region="North") == []  # case-sensitive
    assert a.ids(region="nort") == []
    assert len(a.ids()) == 21


@pytest.mark.parametrize("region", ["r" * 101, "a\x00b", "a\x1bb"], ids=["too-long", "nul", "escape"])
def test_bad_region_filter_is_invalid(a: Api, region: str) -> None:
    a.fails("ListSites", pb.ListSitesRequest(region=region), INVALID, "INVALID_ARGUMENT", ["region"])


# --- Bad input ------------------------------------------------------------------------------

BIG_CONFIG = {"k": "x" * (16 * 1024 - 7)}  # one byte over 16 KiB as JSON

BAD_CREATES: list[tuple[str, pb.CreateSiteRequest, list[str]]] = [
    ("site-id-empty", pb.CreateSiteRequest(site_id="", site=site("n")), ["site_id"]),
    ("site-id-dotdot", pb.CreateSiteRequest(site_id="../x", site=site("n")), ["site_id"]),
    ("site-id-51", pb.CreateSiteRequest(site_id="a" * 51, site=site("n")), ["site_id"]),
    ("site-id-space", pb.CreateSiteRequest(site_id="has space", site=site("n")), ["site_id"]),
    ("site-id-leading-dash", pb.CreateSiteRequest(site_id="-x", site=site("n")), ["site_id"]),
    ("site-id-slash", pb.CreateSiteRequest(site_id="a/b", site=site("n")), ["site_id"]),
    ("site-id-unicode", pb.CreateSiteRequest(site_id="sïte", site=site("n")), ["site_id"]),
    ("no-site", pb.CreateSiteRequest(site_id="ok"), ["site", "site.name"]),
    ("name-empty", pb.CreateSiteRequest(site_id="ok", site=site("")), ["site.name"]),
    ("name-blank", pb.CreateSiteRequest(site_id="ok", site=site("   \t ")), ["site.name"]),
    ("name-101", pb.CreateSiteRequest(site_id="ok", site=site("n" * 101)), ["site.name"]),
    ("name-control", pb.CreateSiteRequest(site_id="ok", site=site("a\x00b")), ["site.name"]),
    ("name-newline", pb.CreateSiteRequest(site_id="ok", site=site("line one\nline two")), ["site.name"]),
    (
        "region-tab",
        pb.CreateSiteRequest(site_id="ok", site=site("n", location={"region": "north\teast"})),
        ["site.location.region"],
    ),
    (
        "lat-91",
        pb.CreateSiteRequest(site_id="ok", site=site("n", location={"latitude": 91})),
        ["site.location.latitude"],
    ),
    (
        "lat-minus-91",
        pb.CreateSiteRequest(site_id="ok", site=site("n", location={"latitude": -91})),
        ["site.location.latitude"],
    ),
    (
        "lat-nan",
        pb.CreateSiteRequest(site_id="ok", site=site("n", location={"latitude": math.nan})),
        ["site.location.latitude"],
    ),
    (
        "lat-inf",
        pb.CreateSiteRequest(site_id="ok", site=site("n", location={"latitude": math.inf})),
        ["site.location.latitude"],
    ),
    (
        "lon-181",
        pb.CreateSiteRequest(site_id="ok", site=site("n", location={"longitude": 181})),
        ["site.location.longitude"],
    ),
    (
        "lon-minus-181",
        pb.CreateSiteRequest(site_id="ok", site=site("n", location={"longitude": -181})),
        ["site.location.longitude"],
    ),
    (
        "country-zaf",
        pb.CreateSiteRequest(site_id="ok", site=site("n", location={"country_code": "zaf"})),
        ["site.location.country_code"],
    ),
    (
        "country-lower",
        pb.CreateSiteRequest(site_id="ok", site=site("n", location={"country_code": "za"})),
        ["site.location.country_code"],
    ),
    (
        "country-three-upper",
        pb.CreateSiteRequest(site_id="ok", site=site("n", location={"country_code": "ZAF"})),
        ["site.location.country_code"],
    ),
    (
        "address-501",
        pb.CreateSiteRequest(site_id="ok", site=site("n", location={"address": "a" * 501})),
        ["site.location.address"],
    ),
    (
        "region-101",
        pb.CreateSiteRequest(site_id="ok", site=site("n", location={"region": "r" * 101})),
        ["site.location.region"],
    ),
    (
        "config-over-16k",
        pb.CreateSiteRequest(site_id="ok", site=site("n", configuration=BIG_CONFIG)),
        ["site.configuration"],
    ),
    (
        "config-nan",
        pb.CreateSiteRequest(site_id="ok", site=site("n", configuration={"gain": math.nan})),
        ["site.configuration"],
    ),
    (
        "config-infinity",
        pb.CreateSiteRequest(site_id="ok", site=site("n", configuration={"x": {"y": [1, -math.inf]}})),
        ["site.configuration"],
    ),
    (
        "config-nul-in-string",
        pb.CreateSiteRequest(site_id="ok", site=site("n", configuration={"a": {"b": ["x\x00y"]}})),
        ["site.configuration"],
    ),
    (
        "config-nul-in-key",
        pb.CreateSiteRequest(site_id="ok", site=site("n", configuration={"a\x00": 1})),
        ["site.configuration"],
    ),
    ("request-id-space", pb.CreateSiteRequest(site_id="ok", site=site("n"), request_id="has space"), ["request_id"]),
    ("request-id-65", pb.CreateSiteRequest(site_id="ok", site=site("n"), request_id="r" * 65), ["request_id"]),
    ("request-id-slash", pb.CreateSiteRequest(site_id="ok", site=site("n"), request_id="a/b"), ["request_id"]),
]


@pytest.mark.parametrize(("request_", "fields"), [c[1:] for c in BAD_CREATES], ids=[c[0] for c in BAD_CREATES])
def test_bad_create_is_invalid_and_writes_nothing(a: Api, request_: pb.CreateSiteRequest, fields: list[str]) -> None:
    err = a.fails("CreateSite", request_, INVALID, "INVALID_ARGUMENT", fields)
    for name in fields:
        assert name in err.message
    assert is_empty(a)
    if request_.site_id == "ok":
        a.fails("GetSite", pb.GetSiteRequest(site_id="ok"), NOT_FOUND, "SITE_NOT_FOUND")


def test_several_bad_fields_give_one_violation_each(a: Api) -> None:
    request = pb.CreateSiteRequest(
        site_id="../x",
        request_id="bad id",
        site=site(
            "",
            location={"latitude": 91, "longitude": 181, "country_code": "za", "address": "a" * 501},
            configuration=BIG_CONFIG,
        ),
    )
    err = a.fails(
        "CreateSite",
        request,
        INVALID,
        "INVALID_ARGUMENT",
        [
            "site_id",
            "request_id",
            "site.name",
            "site.location.latitude",
            "site.location.longitude",
            "site.location.country_code",
            "site.location.address",
            "site.configuration",
        ],
    )
    assert err.message.startswith("invalid fields:")
    assert is_empty(a)


@pytest.mark.parametrize("method", ["GetSite", "DeleteSite"])
@pytest.mark.parametrize("site_id", ["", "../x", "a" * 51, "has space", "a\x00"])
def test_bad_site_id_on_get_and_delete(a: Api, method: str, site_id: str) -> None:
    request = getattr(pb, f"{method}Request")(site_id=site_id)
    a.fails(method, request, INVALID, "INVALID_ARGUMENT", ["site_id"])


BAD_UPDATES: list[tuple[str, pb.Site, list[str], list[str]]] = [
    ("site-id-bad", site("n", site_id="../x"), ["name"], ["site.site_id"]),
    ("site-id-missing", site("n"), ["name"], ["site.site_id"]),
    ("name-empty", site("", site_id="s1"), ["name"], ["site.name"]),
    ("name-101", site("n" * 101, site_id="s1"), ["name"], ["site.name"]),
    ("name-via-empty-mask", site(" ", site_id="s1"), [], ["site.name"]),
    ("lat-path", site(site_id="s1", location={"latitude": 91}), ["location.latitude"], ["site.location.latitude"]),
    (
        "lat-nan-path",
        site(site_id="s1", location={"latitude": math.nan}),
        ["location.latitude"],
        ["site.location.latitude"],
    ),
    ("lon-in-location", site(site_id="s1", location={"longitude": 181}), ["location"], ["site.location.longitude"]),
    (
        "country-path",
        site(site_id="s1", location={"country_code": "za"}),
        ["location.country_code"],
        ["site.location.country_code"],
    ),
    (
        "address-path",
        site(site_id="s1", location={"address": "a" * 501}),
        ["location.address"],
        ["site.location.address"],
    ),
    ("config-big", site(site_id="s1", configuration=BIG_CONFIG), ["configuration"], ["site.configuration"]),
    ("config-nan", site(site_id="s1", configuration={"v": math.nan}), ["configuration"], ["site.configuration"]),
    ("config-nul", site(site_id="s1", configuration={"v": "\x00"}), ["configuration"], ["site.configuration"]),
]


@pytest.mark.parametrize(("new", "paths", "fields"), [c[1:] for c in BAD_UPDATES], ids=[c[0] for c in BAD_UPDATES])
def test_bad_update_is_invalid_and_changes_nothing(a: Api, new: pb.Site, paths: list[str], fields: list[str]) -> None:
    before = a.create("s1", name="Original", location=FULL_LOCATION, configuration=FULL_CONFIG)
    request = pb.UpdateSiteRequest(site=new, update_mask=field_mask_pb2.FieldMask(paths=paths))
    a.fails("UpdateSite", request, INVALID, "INVALID_ARGUMENT", fields)
    assert a.get("s1") == before


@pytest.mark.parametrize(
    "path", ["site_id", "tenant_id", "create_time", "update_time", "bogus", "location.bogus", "name.x"]
)
def test_update_mask_with_bad_path_is_refused(a: Api, path: str) -> None:
    before = a.create("s1", name="Original", configuration=FULL_CONFIG)
    request = pb.UpdateSiteRequest(
        site=site("Changed", site_id="s1", tenant_id=a.tenant),
        update_mask=field_mask_pb2.FieldMask(paths=["name", path]),
    )
    err = a.fails("UpdateSite", request, INVALID, "INVALID_UPDATE_MASK", ["update_mask"])
    assert repr(path) in descriptions(err)[0]
    assert a.get("s1") == before


def test_update_mask_reports_every_bad_path(a: Api) -> None:
    before = a.create("s1", name="Original")
    bad = ["site_id", "tenant_id", "create_time", "bogus"]
    request = pb.UpdateSiteRequest(
        site=site("Changed", site_id="s1"), update_mask=field_mask_pb2.FieldMask(paths=["name", *bad])
    )
    err = a.fails("UpdateSite", request, INVALID, "INVALID_UPDATE_MASK", ["update_mask"] * len(bad))
    texts = descriptions(err)
    for path, text in zip(bad, texts, strict=True):
        assert repr(path) in text
    assert "output only" in texts[0] and "output only" not in texts[3]
    assert a.get("s1") == before


# --- Duplicates and idempotent creates ------------------------------------------------------


def test_duplicate_site_id_is_already_exists(a: Api) -> None:
    first = a.create("dup", name="First", configuration={"v": 1})
    request = pb.CreateSiteRequest(site_id="dup", site=site("Second"))
    err = a.fails("CreateSite", request, grpc.StatusCode.ALREADY_EXISTS, "SITE_ALREADY_EXISTS")
    assert dict(info(err).metadata) == {"resource": "site", "name": "dup"}
    # Also with a (fresh) request_id: the id is taken by a different request.
    request.request_id = "fresh-request"
    a.fails("CreateSite", request, grpc.StatusCode.ALREADY_EXISTS, "SITE_ALREADY_EXISTS")
    assert a.get("dup") == first
    assert a.ids() == ["dup"]


def test_retry_with_same_request_id_returns_the_first_site(a: Api) -> None:
    first = a.create("idem", request_id="req-1", name="Idem", configuration={"v": 1})
    for _ in range(3):
        again = a.create("idem", request_id="req-1", name="Idem", configuration={"v": 1})
        assert again == first
    # Ignored fields (tenant_id, output-only times, site.site_id) do not make a different request.
    other = a.create("idem", request_id="req-1", name="Idem", configuration={"v": 1}, tenant_id="tb_x", site_id="zz")
    assert other == first
    assert a.ids() == ["idem"]
    # The replay is the site as first created, even after it changed.
    a.update(site("Renamed", site_id="idem"), "name")
    assert a.create("idem", request_id="req-1", name="Idem", configuration={"v": 1}) == first
    assert a.get("idem").name == "Renamed"


def test_retry_after_delete_replays_and_does_not_recreate(a: Api) -> None:
    first = a.create("idem", request_id="req-1", name="Idem")
    a.delete("idem")
    assert a.create("idem", request_id="req-1", name="Idem") == first
    assert is_empty(a)
    # A new request_id is a new create.
    again = a.create("idem", request_id="req-2", name="Idem")
    assert again.create_time.ToDatetime() > first.create_time.ToDatetime()
    assert a.ids() == ["idem"]


def test_same_request_id_with_different_body_is_refused(a: Api) -> None:
    first = a.create("idem", request_id="req-1", name="Idem")
    for request in (
        pb.CreateSiteRequest(site_id="idem", request_id="req-1", site=site("Other name")),
        pb.CreateSiteRequest(site_id="other", request_id="req-1", site=site("Idem")),
        pb.CreateSiteRequest(site_id="idem", request_id="req-1", site=site("Idem", configuration={"v": 1})),
    ):
        a.fails("CreateSite", request, INVALID, "REQUEST_ID_REUSED", ["request_id"])
    assert a.ids() == ["idem"]
    assert a.get("idem") == first


def test_request_ids_are_per_tenant(a: Api, b: Api) -> None:
    site_a = a.create("s1", request_id="shared-req", name="A")
    site_b = b.create("s2", request_id="shared-req", name="B")
    assert site_b.tenant_id == b.tenant and site_b.site_id == "s2"
    assert a.ids() == ["s1"] and b.ids() == ["s2"]
    assert a.create("s1", request_id="shared-req", name="A") == site_a


def _attempt(api: Api, request: pb.CreateSiteRequest) -> pb.Site | RichError:
    try:
        created: pb.Site = api.stub.CreateSite(request, metadata=api.md, timeout=20)
    except grpc.RpcError as error:
        return rich_error(error)
    return created


def _race(api: Api, requests: list[pb.CreateSiteRequest]) -> list[pb.Site | RichError]:
    """Send the creates from parallel threads, released together."""
    barrier = threading.Barrier(len(requests))

    def one(request: pb.CreateSiteRequest) -> pb.Site | RichError:
        barrier.wait(timeout=10)
        return _attempt(api, request)

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(one, requests))


#: Backends of the sites service waiting for a row lock in their INSERT INTO sites.sites.
_WAITING_INSERTS = """
SELECT count(*) FROM pg_stat_activity
WHERE application_name LIKE 'towerco-sites/%' AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO sites.sites%'
"""


async def _race_at_insert(
    api: Api, admin_dsn: str, site_id: str, requests: list[pb.CreateSiteRequest]
) -> list[pb.Site | RichError]:
    """Make the creates collide for certain, not just by luck of scheduling.

    An uncommitted insert of the same (tenant, site_id) holds every create at its INSERT;
    once all are waiting there it is rolled back, and they race for the row together.
    """
    conn: asyncpg.Connection[Any] = await asyncpg.connect(admin_dsn)
    # Watched from its own connection: a transaction keeps one snapshot of pg_stat_activity.
    watch: asyncpg.Connection[Any] = await asyncpg.connect(admin_dsn)
    try:
        blocker = conn.transaction()
        await blocker.start()
        released = False
        try:
            await conn.execute(
                "INSERT INTO sites.sites (tenant_id, site_id, name) VALUES ($1, $2, 'blocker')", api.tenant, site_id
            )
            loop = asyncio.get_running_loop()
            with ThreadPoolExecutor(max_workers=len(requests)) as pool:
                calls = [loop.run_in_executor(pool, _attempt, api, r) for r in requests]
                waiting = 0
                for _ in range(400):
                    waiting = await watch.fetchval(_WAITING_INSERTS)
                    if waiting >= len(requests) or any(c.done() for c in calls):
                        break
                    await asyncio.sleep(0.025)
                await blocker.rollback()
                released = True
                results = await asyncio.gather(*calls)
        finally:
            if not released:
                await blocker.rollback()
        assert waiting == len(requests), f"only {waiting} of {len(requests)} creates reached the INSERT together"
        return results
    finally:
        await watch.close()
        await conn.close()


def _retries(n: int) -> list[pb.CreateSiteRequest]:
    return [
        pb.CreateSiteRequest(site_id="race", request_id="race-req", site=site("Race", location={"region": "r"}))
        for _ in range(n)
    ]


def _rivals(n: int) -> list[pb.CreateSiteRequest]:
    return [pb.CreateSiteRequest(site_id="race", request_id=f"req-{i}", site=site(f"writer {i}")) for i in range(n)]


def _check_retries(a: Api, results: list[pb.Site | RichError]) -> None:
    assert all(isinstance(r, pb.Site) for r in results), [r for r in results if isinstance(r, RichError)]
    assert all(r == results[0] for r in results)
    first = results[0]
    assert isinstance(first, pb.Site)
    assert (first.site_id, first.tenant_id, first.name) == ("race", a.tenant, "Race")
    assert a.ids() == ["race"]
    assert a.get("race") == first


def _check_rivals(a: Api, results: list[pb.Site | RichError]) -> None:
    winners = [r for r in results if isinstance(r, pb.Site)]
    losers = [r for r in results if isinstance(r, RichError)]
    assert len(winners) == 1
    expected = [(grpc.StatusCode.ALREADY_EXISTS, "SITE_ALREADY_EXISTS")] * (len(results) - 1)
    assert [(e.code, e.reason) for e in losers] == expected
    assert a.ids() == ["race"]
    assert a.get("race") == winners[0]


def test_concurrent_retries_of_one_request_all_get_the_same_site(a: Api) -> None:
    _check_retries(a, _race(a, _retries(10)))


def test_concurrent_creates_with_different_request_ids_one_wins(a: Api) -> None:
    _check_rivals(a, _race(a, _rivals(10)))


async def test_retries_colliding_at_the_insert_all_get_the_same_site(a: Api, admin_dsn: str) -> None:
    _check_retries(a, await _race_at_insert(a, admin_dsn, "race", _retries(10)))


async def test_rivals_colliding_at_the_insert_one_wins(a: Api, admin_dsn: str) -> None:
    _check_rivals(a, await _race_at_insert(a, admin_dsn, "race", _rivals(10)))


# --- Isolation between tenants --------------------------------------------------------------


def _error_view(err: RichError) -> tuple[Any, ...]:
    return (err.code, err.message, err.reason, info(err).domain, dict(info(err).metadata), err.fields)


def test_other_tenants_site_is_indistinguishable_from_a_missing_one(a: Api, b: Api) -> None:
    update = pb.UpdateSiteRequest(
        site=site("Hijacked", site_id="shared"), update_mask=field_mask_pb2.FieldMask(paths=["name"])
    )
    calls = [
        ("GetSite", pb.GetSiteRequest(site_id="shared")),
        ("UpdateSite", update),
        ("DeleteSite", pb.DeleteSiteRequest(site_id="shared")),
    ]
    missing = {m: _error_view(b.fails(m, r, NOT_FOUND, "SITE_NOT_FOUND")) for m, r in calls}
    original = a.create("shared", name="A's site", location={"region": "north"}, configuration={"secret": "a"})
    for method, request in calls:
        assert _error_view(b.fails(method, request, NOT_FOUND, "SITE_NOT_FOUND")) == missing[method]
    assert a.get("shared") == original
    assert b.ids() == [] and b.ids(region="north") == []
    assert b.analytics() == pb.SiteAnalytics()


def test_tenants_can_use_the_same_site_id_independently(a: Api, b: Api) -> None:
    site_a = a.create("TWR-1", name="A", location={"region": "north"})
    site_b = b.create("TWR-1", name="B", location={"region": "south"}, configuration={"b": True})
    assert (site_b.tenant_id, site_b.name) == (b.tenant, "B")
    assert a.get("TWR-1") == site_a
    assert b.get("TWR-1") == site_b
    b.update(site("B2", site_id="TWR-1"), "name")
    assert a.get("TWR-1") == site_a
    b.delete("TWR-1")
    assert a.get("TWR-1") == site_a
    b.fails("GetSite", pb.GetSiteRequest(site_id="TWR-1"), NOT_FOUND, "SITE_NOT_FOUND")
    assert a.ids() == ["TWR-1"] and b.ids() == []


def test_listing_and_analytics_are_per_tenant(a: Api, b: Api) -> None:
    for n in range(4):
        a.create(f"a{n}", name="a", location={"region": "north"})
    b.create("b0", name="b", location={"region": "south"})
    assert a.ids() == ["a0", "a1", "a2", "a3"]
    assert b.ids() == ["b0"]
    assert b.ids(region="north") == []
    assert dict(a.analytics().sites_by_region) == {"north": 4}
    assert dict(b.analytics().sites_by_region) == {"south": 1}


def test_x_tenant_id_header_cannot_reach_another_tenant(a: Api, b: Api, token: Callable[..., str]) -> None:
    a.create("secret", name="A")
    md = metadata(token(b.tenant), tenant=a.tenant)
    for method, request in [
        ("GetSite", pb.GetSiteRequest(site_id="secret")),
        ("ListSites", pb.ListSitesRequest()),
        ("GetSiteAnalytics", pb.GetSiteAnalyticsRequest()),
        ("DeleteSite", pb.DeleteSiteRequest(site_id="secret")),
    ]:
        fails(getattr(a.stub, method), request, md, grpc.StatusCode.PERMISSION_DENIED, "CROSS_TENANT_DENIED")
    assert a.ids() == ["secret"]


# --- Analytics ------------------------------------------------------------------------------


def test_analytics_counts_by_region(a: Api) -> None:
    assert a.analytics() == pb.SiteAnalytics()
    for n in range(3):
        a.create(f"n{n}", name="n", location={"region": "north"})
    a.create("s0", name="s", location={"region": "south"})
    a.create("S0", name="S", location={"region": "South"})
    a.create("nowhere", name="no location")
    a.create("blank", name="blank region", location={"latitude": 1})
    stats = a.analytics()
    assert stats.total_sites == 7
    assert dict(stats.sites_by_region) == {"north": 3, "south": 1, "South": 1, "": 2}
    assert sum(stats.sites_by_region.values()) == stats.total_sites
    a.delete("n0")
    a.update(site(site_id="s0", location={"region": "north"}), "location.region")
    stats = a.analytics()
    assert stats.total_sites == 6
    assert dict(stats.sites_by_region) == {"north": 3, "South": 1, "": 2}


# --- Never an internal error ----------------------------------------------------------------


def test_odd_but_valid_input_is_stored_as_given(a: Api) -> None:
    config = {"nested": {"deep": [{"a": None}, [], {}, "ünïcødé ✓", -0.5, 1e300]}, "": "empty key", "tab": "a\tb"}
    created = a.create(
        "odd.id_1-X", name="Tøwer ✓ 東京", location={"address": "Ünïcødé St\n2nd line"}, configuration=config
    )
    got = a.get("odd.id_1-X")
    assert got == created
    assert config_of(got) == config
    assert got.name == "Tøwer ✓ 東京"
    assert got.location.address == "Ünïcødé St\n2nd line"


@pytest.mark.parametrize(
    ("md_kind", "code", "reason"),
    [
        ("none", grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING"),
        ("viewer-writes", grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_MISSING"),
    ],
)
def test_callers_without_rights_write_nothing(
    a: Api, token: Callable[..., str], md_kind: str, code: grpc.StatusCode, reason: str
) -> None:
    md = () if md_kind == "none" else metadata(token(a.tenant, role="viewer"))
    fails(a.stub.CreateSite, pb.CreateSiteRequest(site_id="s1", site=site("n")), md, code, reason)
    assert is_empty(a)
