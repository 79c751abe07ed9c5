"""What an update mask may name, read from ``(google.api.field_behavior)`` on the fields.

The protos declare each field's behaviour (AIP-203); update-mask checks (AIP-134) take
their paths from those declarations, as the access policies are taken from the method
options, so a field added to a resource is updatable or not by what its proto says.

A path is fixed when it names a field marked OUTPUT_ONLY, IDENTIFIER or IMMUTABLE: an
update never changes it (what naming one does, refuse or ignore, is each service's
documented choice). Every other field is updatable, and so are the fields of an
updatable message, at any depth; maps and repeated fields are replaced whole, and a
``google.protobuf`` message (Struct, Timestamp, ...) is a value, not fields to name.

A create ignores the OUTPUT_ONLY and IDENTIFIER fields of the resource it is given (the ID
comes from the request), so they must not make a retry look like a different request.

Built once per resource when a service module is imported, never per request.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from google.api import field_behavior_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

#: Behaviours that keep an update from changing a field.
FIXED: frozenset[int] = frozenset(
    {field_behavior_pb2.OUTPUT_ONLY, field_behavior_pb2.IDENTIFIER, field_behavior_pb2.IMMUTABLE}
)

#: Behaviours of the resource fields a create ignores.
IGNORED_ON_CREATE: frozenset[int] = frozenset({field_behavior_pb2.OUTPUT_ONLY, field_behavior_pb2.IDENTIFIER})


def behaviors(field: FieldDescriptor) -> frozenset[int]:
    """The behaviours the proto declares for ``field`` (empty when it declares none)."""
    return frozenset(field.GetOptions().Extensions[field_behavior_pb2.field_behavior])


@dataclass(frozen=True)
class MaskPaths:
    """The update-mask paths of one resource message."""

    #: Paths an update may name: updatable fields, and the fields below updatable messages.
    updatable: frozenset[str]
    #: Paths of OUTPUT_ONLY, IDENTIFIER or IMMUTABLE fields, which no update changes.
    fixed: frozenset[str]
    #: The updatable fields of the resource itself: what an empty mask, or ``*``, updates.
    top_level: frozenset[str]

    @classmethod
    def of(cls, resource: Descriptor) -> MaskPaths:
        updatable: set[str] = set()
        fixed: set[str] = set()
        for path, field in walk(resource):
            (fixed if behaviors(field) & FIXED else updatable).add(path)
        return cls(frozenset(updatable), frozenset(fixed), frozenset(p for p in updatable if "." not in p))


def walk(message: Descriptor, prefix: str = "") -> Iterator[tuple[str, FieldDescriptor]]:
    """Every field an update mask can reach from ``message``, with its path.

    The fields of a fixed field are not reached: the whole field is fixed.
    """
    for field in message.fields:
        path = f"{prefix}{field.name}"
        yield path, field
        nested = field.message_type
        if nested is None or field.is_repeated or behaviors(field) & FIXED:  # maps are repeated too
            continue
        if not nested.full_name.startswith("google.protobuf."):
            yield from walk(nested, f"{path}.")


def ignored_on_create(request: Descriptor, resource: str) -> tuple[str, ...]:
    """Paths in a create ``request`` (``site.tenant_id``) of the ``resource`` fields it ignores."""
    field = request.fields_by_name[resource]
    assert field.message_type is not None, f"{request.full_name}.{resource} is not a message"
    return tuple(f"{resource}.{path}" for path, f in walk(field.message_type) if behaviors(f) & IGNORED_ON_CREATE)
