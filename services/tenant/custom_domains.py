"""A tenant's custom domains: added and removed by platform admins, listed for the gateway.

A domain belongs to one tenant platform-wide (``host_routes``' key is the host alone), so
another tenant's domain is ALREADY_EXISTS. Adding a domain the tenant has, or removing
one it lacks, changes nothing and records nothing. Each change bumps the tenant's version
and is published like every change of its record; ResolveTenant and GetBranding read
``host_routes`` on each call, so they see it at once, and the gateway within its poll.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg
from towerco.internal.v1 import tenant_data_pb2 as internal_pb

from services.runtime import context
from services.runtime.audit import Auditor
from services.runtime.canary import CANARY_TENANTS
from services.runtime.db import Database, savepoint
from services.runtime.errors import ErrorReason, already_exists, not_found
from services.runtime.ids import TENANT_ID
from services.runtime.pagination import PageTokens, page_size
from services.runtime.scope import require_platform_admin
from services.runtime.tenant_cache import TenantCache
from services.runtime.validation import Violations

from . import hosts, queries, records

ADDED = "tenants.add_domain"
REMOVED = "tenants.remove_domain"


class CustomDomains:
    """AddCustomDomain, RemoveCustomDomain and ListCustomDomains over ``host_routes``."""

    def __init__(self, db: Database, cache: TenantCache, audit: Auditor, tokens: PageTokens, base_domain: str) -> None:
        self._db = db
        self._cache = cache
        self._audit = audit
        self._tokens = tokens
        self._base_domain = base_domain

    async def add(self, tenant_id: str, domain: str) -> Mapping[str, Any]:
        """The tenant's row once it serves ``domain``."""
        v = Violations()
        _check_target(v, tenant_id)
        problem = hosts.domain_problem(domain, self._base_domain) if domain else "is required"
        if problem:
            v.add("domain", problem)
        v.raise_if_any()
        with context.platform_scope(tenant_id, ADDED):
            async with self._db.transaction() as conn:
                row: Mapping[str, Any] = await records.lock_live_tenant(conn, tenant_id, "; it can serve no domain")
                if domain in row["domains"]:
                    return row  # idempotent: already there, nothing changes
                if len(row["domains"]) >= hosts.MAX_DOMAINS:
                    v.add("domain", f"tenant {tenant_id!r} has {hosts.MAX_DOMAINS} domains, the most it may have")
                    v.raise_if_any()
                try:
                    async with savepoint(conn):
                        await conn.execute(queries.INSERT_HOST, tenant_id, domain)
                except asyncpg.UniqueViolationError:
                    # Another tenant's (RLS hides its row, the key does not): named, its owner not.
                    raise already_exists(ErrorReason.DOMAIN_ALREADY_EXISTS, domain) from None
                changed = await self._changed(conn, tenant_id, ADDED, domain)
            await records.publish(self._cache, changed)
            return changed

    async def remove(self, tenant_id: str, domain: str) -> Mapping[str, Any]:
        """The tenant's row once it no longer serves ``domain``."""
        v = Violations()
        _check_target(v, tenant_id)
        host = hosts.normalize(domain) if domain else None
        if host is None:
            v.add("domain", "is required" if not domain else "must be a host name such as aiops.operator.example")
        v.raise_if_any()
        assert host is not None
        with context.platform_scope(tenant_id, REMOVED):
            async with self._db.transaction() as conn:
                row: Mapping[str, Any] | None = await conn.fetchrow(queries.GET_TENANT_FOR_UPDATE, tenant_id)
                if row is None:
                    raise not_found(ErrorReason.TENANT_NOT_FOUND, tenant_id)
                if host not in row["domains"]:
                    return row  # idempotent: nothing to remove
                await conn.execute(queries.DELETE_HOST, tenant_id, host)
                changed = await self._changed(conn, tenant_id, REMOVED, host)
            await records.publish(self._cache, changed)
            return changed

    async def _changed(
        self, conn: asyncpg.Connection[Any], tenant_id: str, action: str, domain: str
    ) -> Mapping[str, Any]:
        """Bump the tenant's version (the caches' order) and audit the change, in its transaction."""
        row: Mapping[str, Any] | None = await conn.fetchrow(queries.TOUCH_TENANT, tenant_id)
        assert row is not None, "locked above"
        await self._audit.record(conn, action, f"tenants/{tenant_id}", {"domain": domain})
        return row

    async def list(self, request: internal_pb.ListCustomDomainsRequest) -> internal_pb.ListCustomDomainsResponse:
        """Every domain and its tenant, ordered by domain, one page at a time."""
        size = page_size(request.page_size)
        own = context.current_tenant()
        position = self._tokens.decode(request.page_token, own, {})
        after = str(position.get("after", "")) if position else ""
        async with self._db.platform_read("hosts.list") as conn:
            # The isolation canary's sentinel hosts are the platform's instruments, never routed.
            rows = await conn.fetch(queries.LIST_HOSTS, after, size + 1, CANARY_TENANTS)
        response = internal_pb.ListCustomDomainsResponse(
            domains=[internal_pb.CustomDomain(domain=r["host"], tenant_id=r["tenant_id"]) for r in rows[:size]]
        )
        if len(rows) > size:
            response.next_page_token = self._tokens.encode(own, {}, {"after": rows[size - 1]["host"]})
        return response


def _check_target(v: Violations, tenant_id: str) -> None:
    require_platform_admin()
    if not tenant_id:
        v.add("tenant_id", "is required: a custom domain names its tenant explicitly")
    elif not context.is_valid_tenant_id(tenant_id):
        v.add("tenant_id", TENANT_ID.problem)
    elif tenant_id == context.PLATFORM_TENANT or tenant_id in CANARY_TENANTS:
        v.add("tenant_id", "the platform's own and the isolation canary's tenants serve no custom domain")
