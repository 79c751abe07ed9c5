"""towerco.sites.v1.SiteService: a tenant's sites, always in the caller's own tenant."""

from __future__ import annotations

from typing import Any

from google.protobuf import empty_pb2
from grpc import aio
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as pb_grpc

from services.runtime import context, entitlements, idempotency
from services.runtime.errors import (
    ErrorReason,
    FieldViolation,
    already_exists,
    invalid_argument,
    not_found,
    quota_exceeded,
)
from services.runtime.field_behavior import ignored_on_create
from services.runtime.pagination import page_size
from services.runtime.plans import UNLIMITED
from services.runtime.server import Runtime
from services.runtime.usage_thresholds import record_crossings
from services.runtime.validation import Violations

from . import convert, queries

Ctx = aio.ServicerContext[Any, Any]
#: Fields CreateSite ignores (OUTPUT_ONLY, IDENTIFIER): they must not make a retry look like a different request.
CREATE_IGNORES = ignored_on_create(pb.CreateSiteRequest.DESCRIPTOR, "site")


class SiteServicer(pb_grpc.SiteServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._db = runtime.db
        self._tokens = runtime.page_tokens
        self._audit = runtime.audit
        self._entitlements = runtime.entitlements
        self._faults = runtime.faults
        self._window = runtime.settings.idempotency_window_seconds

    async def CreateSite(self, request: pb.CreateSiteRequest, ctx: Ctx) -> pb.Site:
        v = Violations()
        convert.check_site_id(v, "site_id", request.site_id)
        if not request.HasField("site"):
            v.add("site", "is required")
        convert.check_name(v, "site.name", request.site.name)
        location = None
        if request.site.HasField("location"):
            convert.check_location(v, "site.location", request.site.location)
            location = convert.location_json(request.site.location)
        configuration = convert.configuration_json(v, "site.configuration", request.site.configuration)
        idempotency.check_request_id(v, request.request_id)
        v.raise_if_any()

        tenant_id = context.current_tenant()
        request_hash = idempotency.request_hash(request, CREATE_IGNORES)
        found = entitlements.current() or await self._entitlements.get(tenant_id)
        max_sites = found.limit("max_sites") if found is not None else UNLIMITED
        async with self._db.transaction() as conn:
            if request.request_id:
                replay = await _replay(conn, tenant_id, request.request_id, request_hash, self._window)
                if replay is not None:
                    return replay
            held = await _check_quota(conn, tenant_id, max_sites) if max_sites != UNLIMITED else None
            row = await conn.fetchrow(
                queries.INSERT_SITE, tenant_id, request.site_id, request.site.name.strip(), location, configuration
            )
            if row is None:
                # Taken: by an earlier request, or by a concurrent retry of this one.
                if request.request_id:
                    replay = await _replay(conn, tenant_id, request.request_id, request_hash, self._window)
                    if replay is not None:
                        return replay
                raise already_exists(ErrorReason.SITE_ALREADY_EXISTS, request.site_id)
            site = convert.site_from_row(tenant_id, row)
            await self._audit.record(conn, "sites.create", f"sites/{request.site_id}", {"name": site.name})
            if held is not None:  # under the quota lock: creates are counted one at a time
                await record_crossings(self._audit, conn, "max_sites", held, held + 1, max_sites)
            if request.request_id:
                await conn.execute(queries.DELETE_EXPIRED_CREATE_REQUEST, tenant_id, request.request_id, self._window)
                stored = await conn.fetchval(
                    queries.INSERT_CREATE_REQUEST, tenant_id, request.request_id, request_hash, site.SerializeToString()
                )
                if stored is None:
                    raise idempotency.request_id_reused("create request")
            return site

    async def GetSite(self, request: pb.GetSiteRequest, ctx: Ctx) -> pb.Site:
        _check_site_id(request.site_id)
        tenant_id = context.current_tenant()
        async with self._db.transaction(readonly=True, commit_behind=True) as conn:
            row = await conn.fetchrow(queries.GET_SITE, tenant_id, request.site_id)
        if row is None:
            raise not_found(ErrorReason.SITE_NOT_FOUND, request.site_id)
        return convert.site_from_row(tenant_id, row)

    async def ListSites(self, request: pb.ListSitesRequest, ctx: Ctx) -> pb.ListSitesResponse:
        v = Violations()
        v.text("region", request.region, max_len=convert.MAX_REGION)
        v.raise_if_any()
        size = page_size(request.page_size)
        tenant_id = context.current_tenant()
        query = {"region": request.region}
        position = self._tokens.decode(request.page_token, tenant_id, query)
        after = str(position.get("after", "")) if position else ""
        async with self._db.transaction(readonly=True, commit_behind=True) as conn:
            if request.region:
                rows = await conn.fetch(queries.LIST_SITES_IN_REGION, tenant_id, after, request.region, size + 1)
            else:
                rows = await conn.fetch(queries.LIST_SITES, tenant_id, after, size + 1)
        response = pb.ListSitesResponse(sites=[convert.site_from_row(tenant_id, r) for r in rows[:size]])
        if len(rows) > size:
            response.next_page_token = self._tokens.encode(tenant_id, query, {"after": rows[size - 1]["site_id"]})
        return response

    async def UpdateSite(self, request: pb.UpdateSiteRequest, ctx: Ctx) -> pb.Site:
        paths = _mask_paths(request)
        v = Violations()
        convert.check_site_id(v, "site.site_id", request.site.site_id)
        if "name" in paths:
            convert.check_name(v, "site.name", request.site.name)
        location_parts = frozenset(p.split(".", 1)[1] for p in paths if p.startswith("location."))
        if "location" in paths and request.site.HasField("location"):
            convert.check_location(v, "site.location", request.site.location)
        elif location_parts:
            convert.check_location(v, "site.location", request.site.location, only=location_parts)
        configuration = None
        if "configuration" in paths:
            configuration = convert.configuration_json(v, "site.configuration", request.site.configuration)
        v.raise_if_any()

        tenant_id = context.current_tenant()
        site_id = request.site.site_id
        async with self._db.transaction() as conn:
            row = await conn.fetchrow(queries.GET_SITE_FOR_UPDATE, tenant_id, site_id)
            if row is None:
                raise not_found(ErrorReason.SITE_NOT_FOUND, site_id)
            name = request.site.name.strip() if "name" in paths else row["name"]
            location = row["location"]
            if "location" in paths:
                location = convert.location_json(request.site.location) if request.site.HasField("location") else None
            elif location_parts:
                location = dict(location or convert.location_json(pb.Location()))
                new = convert.location_json(request.site.location)
                location.update({part: new[part] for part in location_parts})
            if configuration is None:
                configuration = row["configuration"]
            updated = await conn.fetchrow(queries.UPDATE_SITE, tenant_id, site_id, name, location, configuration)
            assert updated is not None, "the row is locked FOR UPDATE in this transaction"
            await self._audit.record(conn, "sites.update", f"sites/{site_id}", {"fields": sorted(paths)})
        return convert.site_from_row(tenant_id, updated)

    async def DeleteSite(self, request: pb.DeleteSiteRequest, ctx: Ctx) -> empty_pb2.Empty:
        _check_site_id(request.site_id)
        tenant_id = context.current_tenant()
        async with self._db.transaction() as conn:
            status = await conn.execute(queries.DELETE_SITE, tenant_id, request.site_id)
            if status == "DELETE 0":
                raise not_found(ErrorReason.SITE_NOT_FOUND, request.site_id)
            await self._audit.record(conn, "sites.delete", f"sites/{request.site_id}")
        return empty_pb2.Empty()

    async def GetSiteAnalytics(self, request: pb.GetSiteAnalyticsRequest, ctx: Ctx) -> pb.SiteAnalytics:
        tenant_id = context.current_tenant()
        async with self._db.transaction(readonly=True) as conn:
            rows = await conn.fetch(queries.COUNT_BY_REGION, tenant_id)
            await self._faults.pause("sites.analytics")  # tests: a slow call holding its connection
        by_region = {row["region"]: row["sites"] for row in rows}
        return pb.SiteAnalytics(total_sites=sum(by_region.values()), sites_by_region=by_region)


def _check_site_id(site_id: str) -> None:
    if site_id and convert.SITE_ID.regex.fullmatch(site_id):
        return  # valid, the usual case: no violations to gather
    v = Violations()
    convert.check_site_id(v, "site_id", site_id)
    v.raise_if_any()


def _mask_paths(request: pb.UpdateSiteRequest) -> frozenset[str]:
    paths = list(request.update_mask.paths)
    if not paths or paths == ["*"]:
        return convert.MASK_PATHS.top_level
    bad = []
    for path in paths:
        if path in convert.MASK_PATHS.fixed:
            bad.append(FieldViolation("update_mask", f"{path!r} is output only or immutable and cannot be updated"))
        elif path not in convert.MASK_PATHS.updatable:
            bad.append(FieldViolation("update_mask", f"{path!r} is not a field of Site that can be updated"))
    if bad:
        raise invalid_argument(bad, reason=ErrorReason.INVALID_UPDATE_MASK)
    return frozenset(paths)


async def _replay(conn: Any, tenant_id: str, request_id: str, request_hash: str, window: float) -> pb.Site | None:
    """The first answer to ``request_id`` if its record is within the idempotency window."""
    prior = await conn.fetchrow(queries.GET_CREATE_REQUEST, tenant_id, request_id, window)
    if prior is None:
        return None
    idempotency.check_same_request(prior["request_hash"], request_hash, "create request")
    return pb.Site.FromString(prior["response"])


async def _check_quota(conn: Any, tenant_id: str, max_sites: int) -> int:
    """The sites the tenant holds; RESOURCE_EXHAUSTED when that is ``max_sites`` already. Exact under
    concurrency: the lock taken here is held until the transaction ends, so no other create counts meanwhile."""
    await conn.execute(queries.LOCK_SITE_QUOTA, tenant_id)  # held until this transaction ends
    count: int = await conn.fetchval(queries.COUNT_SITES, tenant_id)
    if count >= max_sites:
        raise quota_exceeded(tenant_id, "max_sites", "sites", count, max_sites, "delete a site")
    return count
