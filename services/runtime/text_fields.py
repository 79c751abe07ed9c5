"""Every string in a request, checked against the text rules in one walk.

What to visit is worked out once per message type from its descriptor (at start-up, by
the request text link): the string fields, repeated strings, string map keys and values,
the ``google.protobuf.Struct`` fields, and the message fields that lead to any of them,
each with its ``(towerco.api.v1.text)`` kind. A request then costs one attribute read per
string it can hold, and a walk only into the sub-messages it has set.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from towerco.api.v1 import text_pb2

from .errors import FieldViolation
from .validation import NUL, NUL_PROBLEM, path_key, text_problem

#: JSON-like well-known types: checked as JSON (keys and strings), named by their field.
_JSON_TYPES = frozenset({"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"})


class _Kind(enum.Enum):
    STRING = enum.auto()
    STRINGS = enum.auto()
    MESSAGE = enum.auto()
    MESSAGES = enum.auto()
    MAP = enum.auto()
    JSON = enum.auto()
    JSONS = enum.auto()


@dataclass
class _Step:
    """One field to visit; for a map, ``display``/``plan`` describe its values."""

    name: str
    kind: _Kind
    display: bool = False
    plan: TextFields | None = None
    string_keys: bool = False
    string_values: bool = False


@dataclass
class TextFields:
    """The fields of one message type that can hold text, found once from its descriptor."""

    full_name: str
    steps: list[_Step] = field(default_factory=list)

    @classmethod
    def of(cls, descriptor: Descriptor) -> TextFields:
        return _build(descriptor, {}, set())

    @property
    def empty(self) -> bool:
        return not self.steps

    def violations(self, message: Any) -> list[FieldViolation]:
        """Each string of ``message`` that breaks its field's text rule, by field path."""
        found: list[FieldViolation] = []
        _walk(self, message, "", found)
        return found


def _build(descriptor: Descriptor, memo: dict[str, TextFields], building: set[str]) -> TextFields:
    known = memo.get(descriptor.full_name)
    if known is not None:
        return known  # built, or being built (a type that refers back to itself): the same object
    plan = memo[descriptor.full_name] = TextFields(descriptor.full_name)
    building.add(descriptor.full_name)
    for f in descriptor.fields:
        step = _step(f, memo, building)
        if step is not None:
            plan.steps.append(step)
    building.discard(descriptor.full_name)
    return plan


def _step(f: FieldDescriptor, memo: dict[str, TextFields], building: set[str]) -> _Step | None:
    repeated = f.is_repeated
    if f.type == FieldDescriptor.TYPE_STRING:
        return _Step(f.name, _Kind.STRINGS if repeated else _Kind.STRING, display=_is_display(f))
    message = f.message_type
    if message is None:
        return None  # a scalar other than a string
    if message.GetOptions().map_entry:
        key, value = message.fields_by_name["key"], message.fields_by_name["value"]
        step = _Step(f.name, _Kind.MAP, string_keys=key.type == FieldDescriptor.TYPE_STRING)
        if value.type == FieldDescriptor.TYPE_STRING:
            step.string_values, step.display = True, _is_display(value)
        elif value.message_type is not None:
            step.plan = _sub_plan(value.message_type, memo, building)
        return step if step.string_keys or step.string_values or step.plan is not None else None
    if message.full_name in _JSON_TYPES:
        return _Step(f.name, _Kind.JSONS if repeated else _Kind.JSON)
    plan = _sub_plan(message, memo, building)
    if plan is None:
        return None
    return _Step(f.name, _Kind.MESSAGES if repeated else _Kind.MESSAGE, plan=plan)


def _sub_plan(message: Descriptor, memo: dict[str, TextFields], building: set[str]) -> TextFields | None:
    """The plan of a field's message type, or None when it can hold no text at all."""
    if message.full_name in _JSON_TYPES:
        return _JSON_VALUE
    plan = _build(message, memo, building)
    if message.full_name in building:  # not known yet whether it holds text: visit it
        return plan
    return None if plan.empty else plan


def _is_display(f: FieldDescriptor) -> bool:
    return bool(f.GetOptions().Extensions[text_pb2.text] == text_pb2.TEXT_KIND_DISPLAY)


#: Stands for a JSON map value (a ``map<string, google.protobuf.Value>``).
_JSON_VALUE = TextFields("google.protobuf.Value")


def _walk(plan: TextFields, message: Any, at: str, found: list[FieldViolation]) -> None:
    for step in plan.steps:
        kind, name = step.kind, step.name
        if kind is _Kind.STRING:
            value = getattr(message, name)
            if value:
                problem = text_problem(value, display=step.display)
                if problem:
                    found.append(FieldViolation(at + name, problem))
        elif kind is _Kind.MESSAGE:
            if message.HasField(name):
                assert step.plan is not None
                _walk(step.plan, getattr(message, name), f"{at}{name}.", found)
        elif kind is _Kind.STRINGS:
            for i, value in enumerate(getattr(message, name)):
                problem = text_problem(value, display=step.display)
                if problem:
                    found.append(FieldViolation(f"{at}{name}[{i}]", problem))
        elif kind is _Kind.MESSAGES:
            assert step.plan is not None
            for i, item in enumerate(getattr(message, name)):
                _walk(step.plan, item, f"{at}{name}[{i}].", found)
        elif kind is _Kind.MAP:
            _walk_map(step, getattr(message, name), at + name, found)
        elif kind is _Kind.JSON:
            if message.HasField(name):
                _check_json(getattr(message, name), at + name, found)
        else:
            for i, item in enumerate(getattr(message, name)):
                _check_json(item, f"{at}{name}[{i}]", found)


def _walk_map(step: _Step, entries: Any, at: str, found: list[FieldViolation]) -> None:
    if step.plan is None and not step.string_values:  # only the keys can hold text
        for key in entries:
            if NUL in key:
                found.append(FieldViolation(f"{at}[{path_key(key)}]", "keys " + NUL_PROBLEM))
        return
    for key, value in entries.items():
        if step.string_keys and NUL in key:
            found.append(FieldViolation(f"{at}[{path_key(key)}]", "keys " + NUL_PROBLEM))
        if step.string_values:
            problem = text_problem(value, display=step.display)
            if problem:
                found.append(FieldViolation(f"{at}[{path_key(key)}]", problem))
        elif step.plan is _JSON_VALUE:
            _check_json(value, f"{at}[{path_key(key)}]", found)
        elif step.plan is not None:
            _walk(step.plan, value, f"{at}[{path_key(key)}].", found)


def _check_json(value: Any, at: str, found: list[FieldViolation]) -> None:
    """A Struct, Value or ListValue: one violation naming the field, saying where inside."""
    name = value.DESCRIPTOR.full_name
    if name == "google.protobuf.Struct":
        inside = _struct_nul(value)
    elif name == "google.protobuf.ListValue":
        inside = _list_nul(value)
    else:
        inside = _value_nul(value)
    if inside is not None:
        where = f" (at ${''.join(reversed(inside))})" if inside else ""
        found.append(FieldViolation(at, f"must not contain the NUL character (U+0000) in a key or a string{where}"))


# Where a NUL is inside a JSON value: None when nowhere, else the path to it from the
# value, innermost part first (built only on the way out of a find: a clean value, the
# common case, costs no string building).


def _struct_nul(struct: Any) -> list[str] | None:
    for key, item in struct.fields.items():
        inside = [] if NUL in key else _value_nul(item)
        if inside is not None:
            inside.append(f".{path_key(key)}")
            return inside
    return None


def _list_nul(values: Any) -> list[str] | None:
    for i, item in enumerate(values.values):
        inside = _value_nul(item)
        if inside is not None:
            inside.append(f"[{i}]")
            return inside
    return None


def _value_nul(value: Any) -> list[str] | None:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return [] if NUL in value.string_value else None
    if kind == "struct_value":
        return _struct_nul(value.struct_value)
    if kind == "list_value":
        return _list_nul(value.list_value)
    return None
