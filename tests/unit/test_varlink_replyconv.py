"""luod.varlink.replyconv says every reply of luod's interfaces exactly as
asyncvarlink's conversion does: the same JSON for a value of the declared
type, the same error (message and location) for anything else."""

from __future__ import annotations

import dataclasses
import enum
import json
import typing

import pytest
from asyncvarlink import VarlinkInterface, varlinksignature
from asyncvarlink.conversion import (
    ConversionError,
    DataclassVarlinkType,
    DictVarlinkType,
    EnumVarlinkType,
    ListVarlinkType,
    ObjectVarlinkType,
    OptionalVarlinkType,
    SimpleVarlinkType,
    VarlinkType,
)
from asyncvarlink.serviceinterface import VarlinkServiceInterface

from luod.varlink import replyconv
from luod.varlink.custody import CustodyInterface
from luod.varlink.manager import ManagerInterface

INTERFACES: list[type[VarlinkInterface]] = [
    CustodyInterface,
    ManagerInterface,
    VarlinkServiceInterface,
]


def _return_types() -> list[tuple[str, VarlinkType]]:
    out: list[tuple[str, VarlinkType]] = []
    for interface in INTERFACES:
        for name in dir(interface):
            signature = varlinksignature(getattr(interface, name))
            if signature is not None and name[:1].isupper():
                out.append((f"{interface.__name__}.{name}", signature.return_type))
    return out


RETURN_TYPES = _return_types()
_SIMPLE: dict[type, list[typing.Any]] = {
    str: ["", "a b"],
    int: [0, -5, True],  # asyncvarlink says a bool as it is where an int is due
    float: [1.5, 2],  # an int converted (the last value: the one nested)
    bool: [True, False],
}


def _valid(vtype: VarlinkType, exact: bool = False) -> list[typing.Any]:
    """Values of `vtype`, each nested type with a few of its own; `exact`:
    only values of exactly the declared types (no int where a float is due)."""
    if isinstance(vtype, SimpleVarlinkType):
        values = _SIMPLE[vtype.as_type]
        return values[:1] if exact and vtype.as_type is float else list(values)
    if isinstance(vtype, OptionalVarlinkType):
        return [None, *_valid(_only(vtype), exact)[:2]]
    if isinstance(vtype, ListVarlinkType):
        return [[], _valid(_only(vtype), exact)[:2]]
    if isinstance(vtype, DictVarlinkType):
        return [{}, {"k": _valid(_only(vtype), exact)[0]}]
    if isinstance(vtype, EnumVarlinkType):
        return list(typing.cast(type[enum.Enum], vtype.as_type))
    if isinstance(vtype, ObjectVarlinkType):
        fields = dict(zip(vtype.as_type.__annotations__, vtype.subtypes(), strict=True))
        full = {name: _valid(sub, exact)[-1] for name, sub in fields.items()}
        out = [full]
        for name, sub in fields.items():
            if isinstance(sub, OptionalVarlinkType):
                out.append({k: v for k, v in full.items() if k != name})  # missing
                out.append(full | {name: None})
        return out
    if isinstance(vtype, DataclassVarlinkType):
        record = vtype.as_type
        names = [f.name for f in dataclasses.fields(record) if f.init]
        subs = dict(zip(names, vtype.subtypes(), strict=True))
        full = {name: _valid(sub, exact)[-1] for name, sub in subs.items()}
        out = [record(**full)]
        for name, sub in subs.items():
            if isinstance(sub, OptionalVarlinkType):
                out.append(record(**(full | {name: None})))
        return out
    raise AssertionError(f"no values for {vtype!r}")


def _only(vtype: VarlinkType) -> VarlinkType:
    (inner,) = vtype.subtypes()
    return inner


class _Other(enum.Enum):
    x = "x"


@dataclasses.dataclass
class _Stranger:
    name: str = "n"


_WRONG: list[typing.Any] = [None, 7, 1.5, "s", True, [], {}, object(), _Other.x, _Stranger()]


def _invalid(value: typing.Any, depth: int = 2) -> list[typing.Any]:
    """`value` with one thing wrong, at its top level or (`depth`) within."""
    out = list(_WRONG)
    if depth == 0:
        return out
    if isinstance(value, dict):
        out.append(value | {"unknown": 1})
        for key in value:
            out.append({k: v for k, v in value.items() if k != key})
            out.extend(value | {key: wrong} for wrong in _invalid(value[key], depth - 1))
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            wrongs = _invalid(getattr(value, f.name), depth - 1)
            out.extend(dataclasses.replace(value, **{f.name: wrong}) for wrong in wrongs)
        # An attribute more than its fields: asyncvarlink says the fields.
        more = dataclasses.replace(value)
        more.unknown = 1  # type: ignore[attr-defined]
        out.append(more)
    elif isinstance(value, list) and value:
        out.extend([*value, wrong] for wrong in _WRONG)
    return out


def _outcome(convert: typing.Callable[..., typing.Any], value: typing.Any) -> typing.Any:
    try:
        # As JSON text: the keys in the same order, not only the same keys.
        return ("ok", json.dumps(convert(value)))
    except ConversionError as e:
        return ("error", e.message, e.location)
    except Exception as e:  # what asyncvarlink lets through, compared too
        return ("raised", type(e).__name__, str(e))


@pytest.mark.parametrize(("method", "vtype"), RETURN_TYPES, ids=[m for m, _ in RETURN_TYPES])
def test_replies_said_as_asyncvarlink_says_them(method: str, vtype: VarlinkType) -> None:
    fast = replyconv.reply_converter(vtype)
    if fast == vtype.tojson:
        return  # holds an fd: said by asyncvarlink's conversion (and fastconv)
    for value in _valid(vtype):
        assert _outcome(fast, value) == _outcome(vtype.tojson, value), value
        for wrong in _invalid(value):
            assert _outcome(fast, wrong) == _outcome(vtype.tojson, wrong), wrong


def test_the_converter_itself_says_what_it_is_given() -> None:
    """Not asyncvarlink's conversion again: the replies of luod's methods
    (GetInfo's and GetStatus's among them) are said by the converter."""
    compiled = 0
    for method, vtype in RETURN_TYPES:
        fast = replyconv.reply_converter(vtype)
        if fast == vtype.tojson:
            continue  # holds an fd: asyncvarlink's (and fastconv's)
        compiled += 1
        say = replyconv.converter(vtype)
        for value in _valid(vtype, exact=True):
            assert json.dumps(say(value)) == json.dumps(vtype.tojson(value)), (method, value)
    assert compiled >= 15
