"""The chain's canonical encoding (RFC 8785) on its own: no server needed.

What JCS refuses is refused, never rounded or hashed as something else; what it accepts
encodes to the bytes the chain has always hashed, so stored chains keep verifying.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from services.audit.hash_chain import CanonicalEncodingError, ChainedEvent, canonical_json


def chained(details: dict[str, Any]) -> ChainedEvent:
    return ChainedEvent(
        tenant_id="tenant_a", sequence=7, event_id="0b7c6f1e-8d2a-4c1b-9f3e-2a6d5c4b3a21", user_id="alice@x.example",
        action="sites.update", resource="sites/TWR-1", details=details, ip_address="203.0.113.7",
        request_id="req-1", outcome="OK", create_time=datetime(2025, 1, 31, 9, 15, 0, 250000, tzinfo=UTC),
        prev_hash="a" * 64,
    )  # fmt: skip


@pytest.mark.parametrize(
    "value",
    [
        2**53,  # the first integer a double cannot tell from its neighbour
        -(2**53 + 1),
        {"n": 2**64},
        "lone \ud800 surrogate",
        {"s": ["\udc00"]},
        {"\ud83d": "lone high surrogate as a key"},
        float("nan"),
        float("inf"),
    ],
    ids=["2^53", "-(2^53+1)", "2^64", "surrogate", "nested-surrogate", "surrogate-key", "nan", "inf"],
)
def test_canonical_json_refuses_what_rfc8785_refuses(value: Any) -> None:
    with pytest.raises(CanonicalEncodingError):
        canonical_json(value)


def test_an_integer_detail_beyond_a_double_is_refused_not_rounded() -> None:
    # The old encoder hashed 2^53 + 1 as 9007199254740992: another event than the one stored.
    with pytest.raises(CanonicalEncodingError, match="9007199254740993"):
        chained({"count": 2**53 + 1}).compute_hash()


def test_hashes_of_valid_events_are_what_they_always_were() -> None:
    # Details as the database gives them back: integral doubles as ints (1e21 and 2^60 are
    # exact doubles), every other number a float. The hash was computed by the encoder the
    # chain used before rfc8785 (commit 600fb80); stored chains depend on it not changing.
    details = {
        "count": 3, "big": 10**21, "pow": 2**60, "ratio": 0.1, "tiny": 5e-324, "neg": -0.0,
        "name": "Tour Eiffel \u20ac \U0001f600 \n\t\x01", "\ufb33": [True, None, {"k": 1e-7}], "1": 333333333.33333329,
    }  # fmt: skip
    event = chained(details)
    assert event.canonical().startswith(
        '{"action":"sites.update","create_time":"2025-01-31T09:15:00.250000Z","details":{"1":333333333.3333333,'
        '"big":1e+21,"count":3,"name":"Tour Eiffel € 😀 \\n\\t\\u0001","neg":0,"pow":1152921504606847000,'
    )
    assert event.compute_hash() == "3c3ef0bc34a4f112dcab752863d6108b2162f0368da7ca631b391829afd439f8"
