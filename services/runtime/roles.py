"""The documented role-to-permissions table, and what a tenant's own roles may hold.

Services check the caller's permissions, not its role. For a token naming no registry user
(dev and test tokens, services) they are the token's ``permissions`` claim, which the issuer
(and ``make token`` in dev) fills from this table; for a registry user (``sub`` = ``user-...``)
they are those of the role the user holds now, built-in or one of its tenant's custom roles
(``services/runtime/user_access.py``).
"""

from __future__ import annotations

from collections.abc import Iterable

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
        "users.read",
        "users.manage",
        "sso.manage",
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
        "users.read",
        "users.manage",
        "sso.manage",
    ),
    # Runs the network day to day: sites and incidents, reads settings and who its colleagues are.
    "operator": (
        "sites.read",
        "sites.write",
        "tenants.read",
        "settings.read",
        "features.read",
        "incidents.manage",
        "users.read",
    ),
    # Read-only access to the tenant's data (not its people: emails are personal data).
    "viewer": ("sites.read", "tenants.read", "settings.read", "features.read"),
    # The platform's own operators (tenant `platform`): onboarding, plans, support.
    "platform_admin": tuple(sorted(ALL_PERMISSIONS)),
}

#: The roles a tenant's user may hold besides its custom ones (platform_admin is the platform's).
TENANT_ROLES = ("admin", "operator", "viewer")

#: What a tenant's custom role may hold at most: its administrator's permissions.
GRANTABLE: frozenset[str] = frozenset(ROLE_PERMISSIONS["admin"])

#: Permissions that are only worth holding with a feature of the plan: a custom role holds
#: one only while the tenant's plan (or an override) includes the feature.
PERMISSION_FEATURES: dict[str, str] = {
    "sso.manage": "sso",
}


def ungrantable(permissions: Iterable[str]) -> list[str]:
    """The permissions no tenant role may hold: unknown ones and the platform's own."""
    return [p for p in permissions if p not in GRANTABLE]


def needs_feature(permissions: Iterable[str], features: frozenset[str]) -> dict[str, str]:
    """Permission -> feature, for each permission tied to a feature not in ``features``."""
    return {
        p: PERMISSION_FEATURES[p]
        for p in permissions
        if p in PERMISSION_FEATURES and PERMISSION_FEATURES[p] not in features
    }
