"""luod.varlink.fastconv's FlatObject and FlatRecord convert exactly as
asyncvarlink's generic conversion does (the one-fd methods use them)."""

from __future__ import annotations

import typing
from typing import Any

import pytest
from asyncvarlink import varlinksignature
from asyncvarlink.conversion import (
    ConversionError,
    DataclassVarlinkType,
    ObjectVarlinkType,
    VarlinkType,
)

from luod.varlink import custody, types
from luod.varlink.fastconv import FlatObject, FlatRecord, FlatReply

FIELDS: dict[str, Any] = {"session": str, "names": list[str], "take": bool, "owner": int}
OPTIONAL = {"names", "take", "owner"}

PARAMS: list[Any] = [
    {"session": "s"},
    {"session": "s", "names": ["a", "b"], "take": True, "owner": 0},
    {"session": "s", "names": [], "take": False},
    {"session": "s", "take": None},  # null: dropped
    {"session": "s", "owner": None, "names": None},
    {"names": ["a"]},  # session missing
    {"session": 1},
    {"session": "s", "names": ["a", 1]},
    {"session": "s", "names": "a"},
    {"session": "s", "take": 1},
    {"session": "s", "owner": True},  # bool for int: the generic path decides
    {"session": "s", "owner": 1.0},
    {"session": "s", "extra": 1},
    None,
    [],
    "s",
]


def _generic() -> ObjectVarlinkType:
    typemap: dict[str, VarlinkType] = {}
    for name, annotation in FIELDS.items():
        vtype = VarlinkType.from_type_annotation(annotation)
        typemap[name] = vtype.optional() if name in OPTIONAL else vtype
    return ObjectVarlinkType(typemap, discardnone=OPTIONAL)


def _outcome(fn: Any, value: Any) -> Any:
    try:
        return ("ok", fn(value))
    except ConversionError as e:
        return ("error", e.message, e.location)


@pytest.mark.parametrize("value", PARAMS)
def test_flat_object_fromjson_same_as_asyncvarlink(value: Any) -> None:
    fast, slow = FlatObject(FIELDS, OPTIONAL), _generic()
    assert _outcome(fast.fromjson, value) == _outcome(slow.fromjson, value)


def test_flat_object_same_description() -> None:
    fast, slow = FlatObject(FIELDS, OPTIONAL), _generic()
    assert (fast.as_varlink, fast.typedefs) == (slow.as_varlink, slow.typedefs)
    with pytest.raises(TypeError):
        FlatObject({"files": list[types.FileToPreserve]})


def test_flat_record_tojson_same_as_asyncvarlink() -> None:
    fast, slow = FlatRecord(types.FileInfo), DataclassVarlinkType(types.FileInfo)
    info = types.FileInfo(name="f", token=1, size=4096, preservedUSec=7)
    assert fast.tojson(info) == slow.tojson(info)
    assert fast.tojson(info) is not info.__dict__
    odd = types.FileInfo(name="x", token=typing.cast(int, "1"), size=0, preservedUSec=0)
    assert _outcome(fast.tojson, odd) == _outcome(slow.tojson, odd)
    assert _outcome(fast.tojson, None) == _outcome(slow.tojson, None)
    assert (fast.as_varlink, fast.typedefs) == (slow.as_varlink, slow.typedefs)
    with pytest.raises(TypeError):
        FlatRecord(types.SessionInfo)


def test_flat_reply_tojson_same_as_asyncvarlink() -> None:
    fast = FlatReply({"file": FlatRecord(types.FileInfo)})
    slow = ObjectVarlinkType({"file": DataclassVarlinkType(types.FileInfo)})
    info = types.FileInfo(name="f", token=1, size=4096, preservedUSec=7)
    odd = types.FileInfo(name="x", token=typing.cast(int, "1"), size=0, preservedUSec=0)
    for value in (
        {"file": info},
        {"file": odd},
        {},
        {"file": info, "more": 1},
        {"other": info},
        None,
    ):
        assert _outcome(fast.tojson, value) == _outcome(slow.tojson, value)
    assert (fast.as_varlink, fast.typedefs) == (slow.as_varlink, slow.typedefs)


def test_in_use() -> None:
    for method in ("PreserveFd", "RetrieveFd", "RetrieveFds"):
        sig = varlinksignature(getattr(custody.CustodyInterface, method))
        assert sig is not None and isinstance(sig.parameter_type, FlatObject), method
    sig = varlinksignature(custody.CustodyInterface.PreserveFd)
    assert sig is not None and "FlatRecord" in repr(sig.return_type)
