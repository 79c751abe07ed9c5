"""Stand-in servicers for tests that serve one method of a real service on an in-process
server, behind the real interceptor chain."""

from __future__ import annotations

from typing import Any

from google.protobuf import empty_pb2
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc


class SitesServing(sites_grpc.SiteServiceServicer):
    """A SiteService whose every method fails NotImplementedError: a test overrides the one it calls.

    (The generated servicer's methods are abstract; a test never calls the others.)
    """

    async def GetSite(self, request: sites_pb.GetSiteRequest, ctx: Any) -> sites_pb.Site:
        raise NotImplementedError

    async def CreateSite(self, request: sites_pb.CreateSiteRequest, ctx: Any) -> sites_pb.Site:
        raise NotImplementedError

    async def ListSites(self, request: sites_pb.ListSitesRequest, ctx: Any) -> sites_pb.ListSitesResponse:
        raise NotImplementedError

    async def UpdateSite(self, request: sites_pb.UpdateSiteRequest, ctx: Any) -> sites_pb.Site:
        raise NotImplementedError

    async def DeleteSite(self, request: sites_pb.DeleteSiteRequest, ctx: Any) -> empty_pb2.Empty:
        raise NotImplementedError

    async def GetSiteAnalytics(self, request: sites_pb.GetSiteAnalyticsRequest, ctx: Any) -> sites_pb.SiteAnalytics:
        raise NotImplementedError
