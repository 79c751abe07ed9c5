"""SQL of the sites service. Every statement filters on tenant_id; RLS is the net."""

from __future__ import annotations

INSERT_SITE = """
INSERT INTO sites.sites (tenant_id, site_id, name, location, configuration)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (tenant_id, site_id) DO NOTHING
RETURNING site_id, name, location, configuration, create_time, update_time
"""

GET_SITE = """
SELECT site_id, name, location, configuration, create_time, update_time
FROM sites.sites WHERE tenant_id = $1 AND site_id = $2
"""

GET_SITE_FOR_UPDATE = GET_SITE + " FOR UPDATE"

UPDATE_SITE = """
UPDATE sites.sites SET name = $3, location = $4, configuration = $5, update_time = now()
WHERE tenant_id = $1 AND site_id = $2
RETURNING site_id, name, location, configuration, create_time, update_time
"""

DELETE_SITE = "DELETE FROM sites.sites WHERE tenant_id = $1 AND site_id = $2"

# Keyset pagination in site_id order: stable, no gaps or duplicates under concurrent writes.
# Two statements, one per index, not one with "($3 IS NULL OR region = $3)": the connection's
# prepared statement goes generic after five calls, and a generic plan of that form cannot
# know which index fits, so with a million rows it walked the primary key filtering on
# region (a region's page of a large tenant read 50 regions' rows) or read all of a tenant's
# rows and sorted them. Each of these reads only its page's rows, in index order, whatever
# the tenant's size (tests/test_list_sites_plans.py).
LIST_SITES = """
SELECT site_id, name, location, configuration, create_time, update_time
FROM sites.sites
WHERE tenant_id = $1 AND site_id > $2
ORDER BY site_id
LIMIT $3
"""

LIST_SITES_IN_REGION = """
SELECT site_id, name, location, configuration, create_time, update_time
FROM sites.sites
WHERE tenant_id = $1 AND region = $3 AND site_id > $2
ORDER BY site_id
LIMIT $4
"""

COUNT_BY_REGION = """
SELECT coalesce(region, '') AS region, count(*) AS sites
FROM sites.sites WHERE tenant_id = $1 GROUP BY 1
"""

# Records older than the window ($3, seconds) are expired even before the purge removes them.
GET_CREATE_REQUEST = """
SELECT request_hash, response FROM sites.create_requests
WHERE tenant_id = $1 AND request_id = $2 AND create_time >= now() - make_interval(secs => $3)
"""

# An expired record of a request_id in use again makes way for the new request's.
DELETE_EXPIRED_CREATE_REQUEST = """
DELETE FROM sites.create_requests
WHERE tenant_id = $1 AND request_id = $2 AND create_time < now() - make_interval(secs => $3)
"""

INSERT_CREATE_REQUEST = """
INSERT INTO sites.create_requests (tenant_id, request_id, request_hash, response) VALUES ($1, $2, $3, $4)
ON CONFLICT (tenant_id, request_id) DO NOTHING
RETURNING 1
"""

#: Serializes one tenant's creates while its `max_sites` is checked, so concurrent
#: creates for the last free slot cannot both see it free. Transaction-scoped.
LOCK_SITE_QUOTA = "SELECT pg_advisory_xact_lock(hashtextextended('sites.max_sites:' || $1, 0))"

COUNT_SITES = "SELECT count(*) FROM sites.sites WHERE tenant_id = $1"
