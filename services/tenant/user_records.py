"""A tenant's users as the registry writes and reads them: used by UserService and sign-in.

Every write runs in the caller's transaction, bound to the tenant: it first bumps the
tenant's version (the row lock makes one tenant's user changes one at a time, so
``max_users`` is counted exactly under concurrent creates), and the caller publishes the
returned tenant row after commit (:func:`services.tenant.records.publish`), so that every
service's cached access of the tenant's users is dropped within milliseconds.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

from google.protobuf import timestamp_pb2
from towerco.tenant.v1 import user_service_pb2 as pb

from services.runtime.audit import Auditor
from services.runtime.errors import ErrorReason, already_exists, quota_exceeded
from services.runtime.plans import UNLIMITED
from services.runtime.roles import ROLE_PERMISSIONS, TENANT_ROLES
from services.runtime.usage_thresholds import record_crossings
from services.runtime.user_access import USER_ID_PREFIX, UserAccess
from services.runtime.validation import Violations

from . import queries

#: An open transaction's connection (asyncpg's, typed loosely as the servicers do).
Conn = Any
Row = Mapping[str, Any]
MAX_EMAIL = 254
#: An email address as the registry takes it (the tenant's admin_email, a user's email).
EMAIL = re.compile(r"^[^@\s]{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")


def normalise_email(raw: str) -> str:
    """Trimmed and lower-cased whole: mail systems treat the local part's case as one address
    in practice, and two seats for ``Ann@x`` and ``ann@x`` would be one person twice."""
    return raw.strip().lower()


def check_email(v: Violations, field: str, email: str) -> None:
    """A normalised email: :data:`EMAIL`, at most 254 characters."""
    if not email:
        v.add(field, "is required")
    elif len(email) > MAX_EMAIL or not EMAIL.fullmatch(email):
        v.add(field, f"must be an e-mail address of at most {MAX_EMAIL} characters")


def new_user_id() -> str:
    return f"{USER_ID_PREFIX}{uuid.uuid4().hex}"


def user_from_row(row: Row) -> pb.User:
    user = pb.User(
        user_id=row["user_id"], email=row["email"], role=row["role"], state=pb.User.State.Value(row["state"])
    )
    user.create_time.CopyFrom(_timestamp(row["create_time"]))
    user.update_time.CopyFrom(_timestamp(row["update_time"]))
    return user


def access_of(row: Row) -> UserAccess:
    """A user's access from its row joined to its custom role (GET_USER_ACCESS)."""
    role = row["role"]
    permissions = ROLE_PERMISSIONS[role] if role in TENANT_ROLES else (row["custom"] or ())
    return UserAccess(row["state"] == "STATE_ACTIVE", role, frozenset(permissions))


async def role_exists(conn: Conn, tenant_id: str, role: str) -> bool:
    return role in TENANT_ROLES or await conn.fetchrow(queries.GET_ROLE, tenant_id, role) is not None


async def lock_users(conn: Conn, tenant_id: str) -> Row:
    """Bump the tenant's version and hold its row until the transaction ends; the new row."""
    tenant: Row | None = await conn.fetchrow(queries.BUMP_VERSION_FOR_USERS, tenant_id)
    assert tenant is not None, "the call's tenant exists: the tenant-state link checked it"
    return tenant


async def create_user(
    conn: Conn,
    audit: Auditor,
    tenant_id: str,
    email: str,
    role: str,
    max_users: int,
    *,
    request_id: str = "",
    request_hash: str = "",
) -> tuple[Row, Row]:
    """Create an ACTIVE user within ``max_users`` exactly; (user row, tenant row to publish).

    For UserService.CreateUser and just-in-time sign-in alike. ``email`` must be normalised
    and ``role`` one the tenant has (:func:`role_exists`). RESOURCE_EXHAUSTED
    QUOTA_EXCEEDED at ``max_users``, ALREADY_EXISTS for a taken email; either way the
    transaction must be rolled back by the caller's ``async with`` (nothing half-created).
    """
    tenant = await lock_users(conn, tenant_id)
    count = 0
    if max_users != UNLIMITED:
        count = await conn.fetchval(queries.COUNT_USERS, tenant_id)
        if count >= max_users:
            raise quota_exceeded(tenant_id, "max_users", "users", count, max_users, "delete a user")
    row = await conn.fetchrow(
        queries.INSERT_NEW_USER, tenant_id, new_user_id(), email, role, request_id or None, request_hash or None
    )
    if row is None:
        raise already_exists(ErrorReason.USER_ALREADY_EXISTS, email)
    await audit.record(conn, "users.create", f"users/{row['user_id']}", {"email": email, "role": role})
    # Under the tenant's lock: creates are counted one at a time, so each crossing is told once.
    await record_crossings(audit, conn, "max_users", count, count + 1, max_users)
    return row, tenant


async def user_by_email(conn: Conn, tenant_id: str, email: str) -> Row | None:
    """The tenant's user with this (normalised) email, if any: sign-in's look-up."""
    row: Row | None = await conn.fetchrow(queries.GET_USER_BY_EMAIL, tenant_id, email)
    return row


def _timestamp(value: Any) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp
