"""Between AuditEvent messages and rows: the rules of each field, and the conversions.

The rules (each broken one is its own ``events[i].<field>`` violation):

- ``event_id``: empty (the service assigns a UUID) or a UUID ``8-4-4-4-12`` in hex; stored
  lower-case, and unique per tenant: an ``event_id`` the tenant's log holds is skipped.
- ``tenant_id``: required, a tenant id (``ids.TENANT_ID``).
- ``user_id``: up to 128 characters, one line.
- ``action``: required, up to 256 characters: a dotted lower-case name (``sites.create``,
  ``security.cross_tenant_denied``) or a full gRPC method name
  (``/towerco.sites.v1.SiteService/CreateSite``).
- ``resource``: up to 256 characters, one line; empty when the action has no single target.
- ``details``: a JSON object of at most 16 KiB in its canonical encoding; numbers finite,
  no NUL character (PostgreSQL's jsonb cannot hold one).
- ``ip_address``: empty or an IPv4/IPv6 address; stored in its normalized text form.
- ``request_id``: up to 128 characters, one line.
- ``outcome``: required, a canonical gRPC status code name (``OK``, ``PERMISSION_DENIED``, ...).
- ``create_time``: optional (unset: when the service received the event); a valid
  Timestamp; kept to the microsecond, as the database stores it.
- ``sequence``, ``prev_hash``, ``hash``: output only, ignored on input.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf import struct_pb2, timestamp_pb2
from towerco.audit.v1 import audit_log_service_pb2 as pb

from services.runtime import context
from services.runtime.ids import TENANT_ID
from services.runtime.validation import Violations

from .hash_chain import CanonicalEncodingError, ChainedEvent, canonical_json

MAX_EVENTS = 500
MAX_USER_ID = 128
MAX_ACTION = 256
MAX_RESOURCE = 256
MAX_REQUEST_ID = 128
MAX_DETAILS_BYTES = 16 * 1024
#: At most this many violations are reported for one batch (then a count of the rest).
MAX_VIOLATIONS = 20

ACTION = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+|/[A-Za-z_][A-Za-z0-9_.]*/[A-Za-z_][A-Za-z0-9_]*")
ACTION_HINT = "a dotted lower-case name such as sites.create, or a gRPC method such as /pkg.Service/Method"
EVENT_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
#: The canonical gRPC status code names: the documented values of ``outcome``.
OUTCOMES = frozenset(code.name for code in grpc.StatusCode)

# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class NewEvent:
    """A validated event to append: every field but its place in the chain."""

    tenant_id: str
    event_id: str
    user_id: str
    action: str
    resource: str
    details: dict[str, Any]
    details_json: str
    ip_address: str
    request_id: str
    outcome: str
    create_time: datetime

    def chained(self, sequence: int, prev_hash: str) -> ChainedEvent:
        event = ChainedEvent(
            tenant_id=self.tenant_id, sequence=sequence, event_id=self.event_id, user_id=self.user_id,
            action=self.action, resource=self.resource, details=self.details, ip_address=self.ip_address,
            request_id=self.request_id, outcome=self.outcome, create_time=self.create_time, prev_hash=prev_hash,
        )  # fmt: skip
        return dataclasses.replace(event, hash=event.compute_hash())


def new_events(events: Any, received: datetime) -> list[NewEvent]:
    """Validate a WriteEvents batch; INVALID_ARGUMENT naming every bad field of every event."""
    v = Violations()
    if len(events) == 0:
        v.add("events", "is required: send at least one event")
    elif len(events) > MAX_EVENTS:
        v.add("events", f"must hold at most {MAX_EVENTS} events (got {len(events)})")
    v.raise_if_any()
    checked = [_new_event(v, f"events[{i}]", event, received) for i, event in enumerate(events)]
    if len(v.items) > MAX_VIOLATIONS:
        # The details travel in the response trailers, which clients cap at a few KiB.
        more = len(v.items) - MAX_VIOLATIONS
        del v.items[MAX_VIOLATIONS:]
        v.add("events", f"{more} more violations not listed; fix the ones above and send again")
    v.raise_if_any()
    return [event for event in checked if event is not None]


def _new_event(v: Violations, at: str, event: pb.AuditEvent, received: datetime) -> NewEvent | None:
    before = len(v.items)
    event_id = event.event_id
    if event_id and not EVENT_ID.fullmatch(event_id):
        v.add(f"{at}.event_id", "must be a UUID such as 0b7c6f1e-8d2a-4c1b-9f3e-2a6d5c4b3a21, or empty")
    if not event.tenant_id:
        v.add(f"{at}.tenant_id", "is required")
    elif not context.is_valid_tenant_id(event.tenant_id):
        v.add(f"{at}.tenant_id", TENANT_ID.problem)
    v.text(f"{at}.user_id", event.user_id, max_len=MAX_USER_ID)
    if len(event.action) > MAX_ACTION:
        v.add(f"{at}.action", f"must be at most {MAX_ACTION} characters (got {len(event.action)})")
    else:
        v.pattern(f"{at}.action", event.action, ACTION, ACTION_HINT)
    v.text(f"{at}.resource", event.resource, max_len=MAX_RESOURCE)
    details, details_json = _details(v, f"{at}.details", event)
    ip = _ip_address(v, f"{at}.ip_address", event.ip_address)
    v.text(f"{at}.request_id", event.request_id, max_len=MAX_REQUEST_ID)
    if not event.outcome:
        v.add(f"{at}.outcome", "is required")
    elif event.outcome not in OUTCOMES:
        v.add(f"{at}.outcome", "must be a canonical gRPC status code name, e.g. OK or PERMISSION_DENIED")
    create_time = received
    if event.HasField("create_time"):
        create_time = _timestamp(v, f"{at}.create_time", event.create_time) or received
    if len(v.items) > before:
        return None
    return NewEvent(
        tenant_id=event.tenant_id, event_id=(event_id or str(uuid.uuid4())).lower(), user_id=event.user_id,
        action=event.action, resource=event.resource, details=details, details_json=details_json, ip_address=ip,
        request_id=event.request_id, outcome=event.outcome, create_time=create_time,
    )  # fmt: skip


def _details(v: Violations, field: str, event: pb.AuditEvent) -> tuple[dict[str, Any], str]:
    details = struct_to_dict(event.details) if event.HasField("details") else {}
    try:
        encoded = canonical_json(details)
    except CanonicalEncodingError as exc:
        v.add(field, f"must be plain JSON: {exc}")
        return {}, "{}"
    size = len(encoded.encode("utf-8"))
    if size > MAX_DETAILS_BYTES:
        v.add(field, f"must be at most {MAX_DETAILS_BYTES} bytes as JSON (got {size})")
    return details, encoded


def _ip_address(v: Violations, field: str, value: str) -> str:
    if not value:
        return ""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        v.add(field, "must be an IPv4 or IPv6 address in text form, or empty")
        return ""


def _timestamp(v: Violations, field: str, value: timestamp_pb2.Timestamp) -> datetime | None:
    if not (_MIN_SECONDS <= value.seconds <= _MAX_SECONDS and 0 <= value.nanos < 1_000_000_000):
        v.add(field, "must be a valid Timestamp (0001-01-01 to 9999-12-31, nanos 0..999999999)")
        return None
    return _EPOCH + timedelta(seconds=value.seconds, microseconds=value.nanos // 1000)


def time_filter(v: Violations, field: str, value: timestamp_pb2.Timestamp | None) -> datetime | None:
    """An optional time filter of a request (None when unset), to the microsecond."""
    return None if value is None else _timestamp(v, field, value)


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    return {key: _value(value) for key, value in struct.fields.items()}


def _value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [_value(item) for item in value.list_value.values]
    if kind == "number_value":
        return value.number_value
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None  # null_value, or no kind at all


def chained_from_row(row: Mapping[str, Any]) -> ChainedEvent:
    return ChainedEvent(
        tenant_id=row["tenant_id"], sequence=row["sequence"], event_id=str(row["event_id"]), user_id=row["user_id"],
        action=row["action"], resource=row["resource"], details=row["details"], ip_address=row["ip_address"],
        request_id=row["request_id"], outcome=row["outcome"], create_time=row["create_time"],
        prev_hash=row["prev_hash"], hash=row["hash"],
    )  # fmt: skip


def event_from_row(row: Mapping[str, Any]) -> pb.AuditEvent:
    event = pb.AuditEvent(
        event_id=str(row["event_id"]), tenant_id=row["tenant_id"], sequence=row["sequence"], user_id=row["user_id"],
        action=row["action"], resource=row["resource"], ip_address=row["ip_address"], request_id=row["request_id"],
        outcome=row["outcome"], prev_hash=row["prev_hash"], hash=row["hash"],
    )  # fmt: skip
    if row["details"]:
        event.details.update(row["details"])
    event.create_time.FromDatetime(row["create_time"])
    return event
