from __future__ import annotations

from towerco.sites.v1 import sites_service_pb2 as pb

from .support import bearer


def test_create_then_get(sites, token, tenant_pair):
    tenant, _ = tenant_pair
    md = bearer(token(tenant))
    created = sites.CreateSite(pb.CreateSiteRequest(site_id="TWR-1", site=pb.Site(name="One")), metadata=md, timeout=10)
    assert created.tenant_id == tenant
    got = sites.GetSite(pb.GetSiteRequest(site_id="TWR-1"), metadata=md, timeout=10)
    assert got.name == "One"
