"""Deployment: the local all-in-one stack (``deploy.local``) and, later, cluster manifests."""
