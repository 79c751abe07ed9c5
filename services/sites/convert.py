"""Between the Site message and its row: validation, JSON columns, timestamps."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from towerco.sites.v1 import sites_service_pb2 as pb

from services.runtime.field_behavior import MaskPaths
from services.runtime.ids import IdRule
from services.runtime.validation import Violations

SITE_ID = IdRule(first="A-Za-z0-9", rest="A-Za-z0-9._-", min_length=1, max_length=50)
COUNTRY_CODE = re.compile(r"^[A-Z]{2}$")
MAX_NAME = 100
MAX_ADDRESS = 500
MAX_REGION = 100
MAX_CONFIGURATION_BYTES = 16 * 1024

#: Update-mask paths a client may name, and the fixed ones it may not, from the Site proto.
MASK_PATHS = MaskPaths.of(pb.Site.DESCRIPTOR)
LOCATION_FIELDS = ("latitude", "longitude", "address", "region", "country_code")


def check_site_id(v: Violations, field: str, value: str) -> None:
    v.identifier(field, value, SITE_ID)


def check_name(v: Violations, field: str, value: str) -> None:
    v.text(field, value, max_len=MAX_NAME, required=True)


def check_location(v: Violations, prefix: str, location: pb.Location, only: frozenset[str] | None = None) -> None:
    def wanted(name: str) -> bool:
        return only is None or name in only

    if wanted("latitude"):
        v.number(f"{prefix}.latitude", location.latitude, -90, 90)
    if wanted("longitude"):
        v.number(f"{prefix}.longitude", location.longitude, -180, 180)
    if wanted("address"):
        v.text(f"{prefix}.address", location.address, max_len=MAX_ADDRESS, multiline=True)
    if wanted("region"):
        v.text(f"{prefix}.region", location.region, max_len=MAX_REGION)
    if wanted("country_code") and location.country_code and not COUNTRY_CODE.fullmatch(location.country_code):
        v.add(f"{prefix}.country_code", "must be an ISO 3166-1 alpha-2 code such as 'ZA' (two upper-case letters)")


def configuration_json(v: Violations, field: str, configuration: struct_pb2.Struct) -> dict[str, Any]:
    try:
        # MessageToDict itself refuses NaN and infinities in a Struct (ValueError).
        value: dict[str, Any] = json_format.MessageToDict(configuration)
        size = len(json.dumps(value, allow_nan=False, separators=(",", ":")).encode())
    except (ValueError, json_format.Error):
        v.add(field, "must not contain NaN or infinite numbers")
        return {}
    if size > MAX_CONFIGURATION_BYTES:
        v.add(field, f"must be at most {MAX_CONFIGURATION_BYTES} bytes as JSON (got {size})")
    return value


def location_json(location: pb.Location) -> dict[str, Any]:
    return {
        "latitude": location.latitude,
        "longitude": location.longitude,
        "address": location.address,
        "region": location.region,
        "country_code": location.country_code,
    }


def site_from_row(tenant_id: str, row: Mapping[str, Any]) -> pb.Site:
    site = pb.Site(
        site_id=row["site_id"],
        tenant_id=tenant_id,
        name=row["name"],
        create_time=_timestamp(row["create_time"]),
        update_time=_timestamp(row["update_time"]),
    )
    location = row["location"]
    if location is not None:
        site.location.CopyFrom(pb.Location(**{k: location[k] for k in LOCATION_FIELDS if k in location}))
    configuration = row["configuration"]
    if configuration:
        site.configuration.update(configuration)
    return site


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAIVE_EPOCH = datetime(1970, 1, 1)


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """``Timestamp.FromDatetime(value)`` (naive: UTC), without its time tuple and ``timegm``: every
    site a read answers carries two, and this costs a third."""
    since = value - (_EPOCH if value.tzinfo is not None else _NAIVE_EPOCH)
    return timestamp_pb2.Timestamp(seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1000)
