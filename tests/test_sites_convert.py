"""A site row becomes the Site message the protobuf library's own conversions would make.

``convert.site_from_row`` builds every site a read answers (fifty per ListSites page), so it
computes its timestamps without ``Timestamp.FromDatetime``; these check it gives the same.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from google.protobuf import timestamp_pb2
from towerco.sites.v1 import sites_service_pb2 as pb

from services.sites import convert


def _from_datetime(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def test_a_timestamp_is_what_from_datetime_makes_for_any_instant_offset_or_naive_value() -> None:
    draw = random.Random(14)
    zones = [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5, minutes=-30)), None]
    edges = [
        datetime(1, 1, 2),
        datetime(1969, 12, 31, 23, 59, 59, 999_999),
        datetime(1970, 1, 1),
        datetime(9999, 12, 30),
    ]
    values = [edge.replace(tzinfo=zone) for edge in edges for zone in zones]
    for _ in range(5_000):
        instant = datetime(1970, 1, 1) + timedelta(
            seconds=draw.randint(-62_000_000_000, 253_000_000_000), microseconds=draw.randint(0, 999_999)
        )
        values.append(instant.replace(tzinfo=draw.choice(zones)))
    for value in values:
        assert convert._timestamp(value) == _from_datetime(value), value


def _row(location: dict[str, Any] | None, configuration: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "site_id": "S-1",
        "name": "North mast",
        "location": location,
        "configuration": configuration,
        "create_time": datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        "update_time": datetime(2026, 11, 30, 14, 0, 0, 999_999, tzinfo=UTC),
    }


def test_a_site_row_becomes_the_site_with_each_field_present_as_stored() -> None:
    full = {"latitude": -33.9, "longitude": 18.4, "address": "1 Main\nRoad", "region": "WC", "country_code": "ZA"}
    for location in (None, {}, full, {"region": "WC"}):
        configurations: tuple[dict[str, Any] | None, ...] = (
            None,
            {},
            {"height_m": 42, "bands": ["n78", None], "shared": {"with": "tb"}},
        )
        for configuration in configurations:
            site = convert.site_from_row("acme", _row(location, configuration))
            expected = pb.Site(site_id="S-1", tenant_id="acme", name="North mast")
            if location is not None:
                expected.location.CopyFrom(pb.Location(**location))
            expected.configuration.update(configuration or {})
            expected.create_time.FromDatetime(datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC))
            expected.update_time.FromDatetime(datetime(2026, 11, 30, 14, 0, 0, 999_999, tzinfo=UTC))
            assert site == expected, (location, configuration)
            assert site.HasField("location") == (location is not None)
            assert site.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)
