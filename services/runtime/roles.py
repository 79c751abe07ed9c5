"""The documented role-to-permissions table.

Services check the token's ``permissions`` claim, not its role; this table is what the
identity provider (and ``make token`` in dev) puts into that claim for each role.
"""

from __future__ import annotations

ALL_PERMISSIONS: frozenset[str] = frozenset(
    {
        "sites.read",
        "sites.write",
        "tenants.read",
        "tenants.manage",
        "settings.read",
        "settings.write",
        "features.read",
        "features.manage",
        "audit.read",
        "incidents.manage",
    }
)

ROLE_PERMISSIONS: dict[str, tuple[str, ...]] = {
    # A tenant's administrator: everything within the tenant.
    "admin": (
        "sites.read",
        "sites.write",
        "tenants.read",
        "settings.read",
        "settings.write",
        "features.read",
        "audit.read",
        "incidents.manage",
    ),
    # Runs the network day to day: sites and incidents, reads settings.
    "operator": ("sites.read", "sites.write", "tenants.read", "settings.read", "features.read", "incidents.manage"),
    # Read-only access to the tenant's data.
    "viewer": ("sites.read", "tenants.read", "settings.read", "features.read"),
    # The platform's own operators (tenant `platform`): onboarding, plans, support.
    "platform_admin": tuple(sorted(ALL_PERMISSIONS)),
}
