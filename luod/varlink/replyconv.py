"""Replies said by a converter made once from their type.

asyncvarlink says a reply by walking its type for every reply, entering a
context manager for each key and element that records where an error
happened (contextlib's generator-based manager: six Python calls each). For
GetInfo's reply, eight of them, that was more than a third of luod's
instructions per call (230.6 against 142.1 K without them; issue 12, goal
7). `reply_converter` makes, once per method (when the server starts), a
converter that says exactly what asyncvarlink's tojson says for a value of
the declared type, without them. Anything it does not expect (a value of
another type, a key with no type, a type of luod's own raising) is said
again by asyncvarlink's conversion from the top, so an error reads as
before. A type that holds an fd is left to asyncvarlink's conversion (and
luod.varlink.fastconv): saying an fd adds it to the reply's fds, which must
not happen twice.

Only asyncvarlink's public conversion types are read here: their classes,
`as_type` and `subtypes()`.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Callable

from asyncvarlink.conversion import (
    DataclassVarlinkType,
    DictVarlinkType,
    EnumVarlinkType,
    FileDescriptorVarlinkType,
    ListVarlinkType,
    ObjectVarlinkType,
    OOBTypeState,
    OptionalVarlinkType,
    SimpleVarlinkType,
    VarlinkType,
)

Say = Callable[[typing.Any], typing.Any]
ReplyConverter = Callable[[typing.Any, OOBTypeState], typing.Any]


class _Unexpected(Exception):
    """A value the converter does not say: asyncvarlink's conversion does."""


def reply_converter(vtype: VarlinkType) -> ReplyConverter:
    """What `vtype.tojson` does, quicker for what a method returns."""
    if any(isinstance(t, FileDescriptorVarlinkType) for t in vtype.traverse()):
        return vtype.tojson
    say = converter(vtype)

    def convert(obj: typing.Any, oobstate: OOBTypeState = None) -> typing.Any:
        try:
            return say(obj)
        except Exception:
            # asyncvarlink's answer, error and all, for anything unexpected.
            return vtype.tojson(obj, oobstate)

    return convert


def converter(vtype: VarlinkType) -> Say:
    """`vtype`'s tojson for a value it accepts as it is; _Unexpected (or the
    ConversionError of a type of luod's) for anything else. Not for types
    that hold an fd."""
    kind = type(vtype)
    if kind is SimpleVarlinkType:
        return _simple(vtype.as_type)
    if kind is OptionalVarlinkType:
        return _optional(converter(_only(vtype)))
    if kind is ListVarlinkType:
        return _list(converter(_only(vtype)))
    if kind is DictVarlinkType:
        return _dict(converter(_only(vtype)))
    if kind is EnumVarlinkType:
        return _enum(vtype.as_type)
    if kind is ObjectVarlinkType:
        # The TypedDict asyncvarlink made of its keys, in their order.
        return _object(_fields(list(vtype.as_type.__annotations__), vtype))
    if kind is DataclassVarlinkType:
        names = [f.name for f in dataclasses.fields(vtype.as_type) if f.init]
        return _dataclass(vtype.as_type, _fields(names, vtype))
    # Anything else (a literal, a set, a foreign object, luod's own types)
    # converts without context managers already, and without effects.
    return lambda obj: vtype.tojson(obj, None)


def _only(vtype: VarlinkType) -> VarlinkType:
    (inner,) = vtype.subtypes()
    return inner


# A key of an object: its name, its type if a simple one (checked in place,
# without a call), whether it may be missing or null, its converter.
_Field = tuple[str, "type | None", bool, Say]


def _fields(names: list[str], vtype: VarlinkType) -> list[_Field]:
    fields: list[_Field] = []
    for name, sub in zip(names, vtype.subtypes(), strict=True):
        optional = type(sub) is OptionalVarlinkType
        base = _only(sub) if optional else sub
        simple = base.as_type if type(base) is SimpleVarlinkType else None
        fields.append((name, simple, optional, converter(sub)))
    return fields


def _simple(want: type) -> Say:
    def simple(obj: typing.Any) -> typing.Any:
        if isinstance(obj, want):
            return obj
        raise _Unexpected  # asyncvarlink converts (an int as a float) or refuses

    return simple


def _optional(say: Say) -> Say:
    def optional(obj: typing.Any) -> typing.Any:
        return None if obj is None else say(obj)

    return optional


def _list(say: Say) -> Say:
    def as_list(obj: typing.Any) -> typing.Any:
        if not isinstance(obj, list):
            raise _Unexpected
        return [say(element) for element in obj]

    return as_list


def _dict(say: Say) -> Say:
    def as_dict(obj: typing.Any) -> typing.Any:
        if not isinstance(obj, dict):
            raise _Unexpected
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise _Unexpected
            out[key] = say(value)
        return out

    return as_dict


def _enum(want: type[enum.Enum]) -> Say:
    def as_enum(obj: typing.Any) -> typing.Any:
        if isinstance(obj, want):
            return obj.name
        raise _Unexpected

    return as_enum


def _object(fields: list[_Field]) -> Say:
    def as_object(obj: typing.Any) -> typing.Any:
        if not isinstance(obj, dict):
            raise _Unexpected
        out = {}
        found = 0
        for name, simple, optional, say in fields:
            if name not in obj:
                if optional:
                    continue  # a missing optional key stays missing
                raise _Unexpected
            found += 1
            value = obj[name]
            if simple is None:
                out[name] = say(value)
            elif isinstance(value, simple) or (optional and value is None):
                out[name] = value
            else:
                raise _Unexpected
        if found != len(obj):
            raise _Unexpected  # a key with no type
        return out

    return as_object


def _dataclass(record: type, fields: list[_Field]) -> Say:
    as_fields = _object(fields)
    count = len(fields)

    def as_dataclass(obj: typing.Any) -> typing.Any:
        # asyncvarlink says any dataclass by its fields (getattr); another
        # than the declared one, or one with an attribute more or less than
        # its fields, is left to it.
        if type(obj) is not record or len(obj.__dict__) != count:
            raise _Unexpected
        return as_fields(obj.__dict__)

    return as_dataclass
