"""The error catalogue: every ErrorInfo reason, with the status code, metadata keys and
RetryInfo it is sent with, read once from ``towerco.api.v1.ErrorReason`` and its
``(towerco.api.v1.error)`` options (protos/towerco/api/v1/error_reason.proto).

The reason sent on the wire is the enum value's name, unchanged. A value without its
option, or with a code that is not a gRPC status name, fails at import: the services do
not start with a catalogue they cannot read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeAlias

import grpc
from towerco.api.v1 import error_reason_pb2
from towerco.api.v1.error_reason_pb2 import ErrorReason as ErrorReason

#: One value of the catalogue, e.g. ``ErrorReason.CROSS_TENANT_DENIED``.
Reason: TypeAlias = ErrorReason.ValueType


class CatalogueError(ValueError):
    """An error disagrees with the catalogue: a reason it lacks, or another code,
    other metadata keys or RetryInfo than its entry declares."""


@dataclass(frozen=True)
class Entry:
    """How one reason is sent."""

    name: str
    code: grpc.StatusCode
    #: Keys every error with this reason carries.
    metadata: frozenset[str]
    retry_info: bool
    #: Keys some errors with this reason carry besides.
    optional_metadata: frozenset[str] = frozenset()


def _read() -> Mapping[str, Entry]:
    entries: dict[str, Entry] = {}
    for value in ErrorReason.DESCRIPTOR.values:
        if value.number == ErrorReason.ERROR_REASON_UNSPECIFIED:
            continue
        options = value.GetOptions()
        if not options.HasExtension(error_reason_pb2.error):
            raise CatalogueError(f"ErrorReason.{value.name} has no (towerco.api.v1.error) option")
        spec = options.Extensions[error_reason_pb2.error]
        try:
            code = grpc.StatusCode[spec.code]
        except KeyError:
            raise CatalogueError(f"ErrorReason.{value.name}: {spec.code!r} is not a gRPC status code") from None
        entries[value.name] = Entry(
            value.name, code, frozenset(spec.metadata), spec.retry_info, frozenset(spec.optional_metadata)
        )
    return MappingProxyType(entries)


#: Every catalogued reason by its wire name.
CATALOGUE: Mapping[str, Entry] = _read()


def name(reason: Reason) -> str:
    """The wire string of ``reason`` (its ErrorInfo ``reason``); refuses anything else."""
    if isinstance(reason, str) or reason == ErrorReason.ERROR_REASON_UNSPECIFIED:
        raise CatalogueError(f"not a catalogued reason: {reason!r}; pass an ErrorReason value")
    try:
        return ErrorReason.Name(reason)
    except ValueError:
        raise CatalogueError(f"not a catalogued reason: {reason!r}") from None


def entry(reason_name: str) -> Entry:
    """The catalogue's entry for the wire string ``reason_name``."""
    found = CATALOGUE.get(reason_name)
    if found is None:
        raise CatalogueError(f"ErrorInfo reason {reason_name!r} is not in the catalogue (ErrorReason)")
    return found


def check(reason_name: str, code: grpc.StatusCode, metadata: Iterable[str], retry_info: bool) -> None:
    """Raises :class:`CatalogueError` unless an error sent this way matches its entry."""
    expected = entry(reason_name)
    keys = frozenset(metadata)
    required = expected.metadata
    if (code, retry_info) != (expected.code, expected.retry_info) or not (
        required <= keys <= required | expected.optional_metadata
    ):
        raise CatalogueError(
            f"{reason_name} is catalogued as {expected.code.name} with metadata {sorted(required)}"
            f"{f' (and perhaps {sorted(expected.optional_metadata)})' if expected.optional_metadata else ''}"
            f"{' and RetryInfo' if expected.retry_info else ''}, not {code.name} with {sorted(keys)}"
            f"{' and RetryInfo' if retry_info else ''}"
        )
