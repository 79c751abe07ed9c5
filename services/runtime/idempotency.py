"""Idempotent creates: a ``request_id`` names one create, and a retry of it is answered alike.

A create that carries a ``request_id`` (optional; it follows :data:`ids.REQUEST_ID`)
stores, beside what it made, the hash of its request. A repeat with the same
``request_id`` and the same hash gets the first answer again; the same ``request_id`` on a
different request is refused (INVALID_ARGUMENT, REQUEST_ID_REUSED). Where the answer is
kept, and what a repeat without a ``request_id`` gets, is each service's own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from google.protobuf.message import Message

from .errors import ErrorReason, FieldViolation, ServiceError, invalid_argument
from .ids import REQUEST_ID
from .validation import Violations

REUSED = ErrorReason.REQUEST_ID_REUSED


def check_request_id(v: Violations, value: str) -> None:
    """Records a violation for a ``request_id`` that breaks the rule; empty is allowed."""
    v.identifier("request_id", value, REQUEST_ID, required=False)


def request_hash(request: Message, ignored: Iterable[str] = ()) -> str:
    """The request's hash, without its ``request_id`` and the ``ignored`` fields.

    ``ignored`` names fields the create does not read (``tenant.state``), so that a retry
    that differs only there is still the same request.
    """
    body = type(request)()
    body.CopyFrom(request)
    body.ClearField("request_id")
    for path in ignored:
        parent: Message = body
        *outer, name = path.split(".")
        for step in outer:
            parent = getattr(parent, step)
        parent.ClearField(name)
    return hashlib.sha256(body.SerializeToString(deterministic=True)).hexdigest()


def request_id_reused(what: str) -> ServiceError:
    return invalid_argument(
        [FieldViolation("request_id", f"was already used for a different {what}; use a new request_id")],
        reason=REUSED,
    )


def check_same_request(stored_hash: str, request_hash: str, what: str) -> None:
    """Refuses a repeat of a ``request_id`` whose request differs from the first one's."""
    if stored_hash != request_hash:
        raise request_id_reused(what)
