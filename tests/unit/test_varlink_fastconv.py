"""luod.varlink.fastconv converts exactly as asyncvarlink does, only quicker."""

from __future__ import annotations

from typing import Any

import pytest
from asyncvarlink.conversion import ConversionError, DataclassVarlinkType, ListVarlinkType

from luod.varlink import custody, types
from luod.varlink.fastconv import FlatRecordList

GOOD: list[Any] = [
    [],
    [{"name": "a", "fileDescriptor": 0}],
    [{"name": f"f{i}", "fileDescriptor": i} for i in range(253)],
]
BAD: list[Any] = [
    None,
    "files",
    [None],
    [{"name": "a"}],
    [{"name": "a", "fileDescriptor": "0"}],
    [{"name": "a", "fileDescriptor": 0, "extra": 1}],
    [{"name": 1, "fileDescriptor": 0}],
    [{"name": "a", "fileDescriptor": 0}, {"name": "b", "fileDescriptor": 1.5}],
    [{"name": "a", "fileDescriptor": True}],  # bool: the generic path decides
]


def _generic(record: type) -> ListVarlinkType:
    return ListVarlinkType(DataclassVarlinkType(record))


def _outcome(fn: Any, value: Any) -> Any:
    try:
        return ("ok", fn(value))
    except ConversionError as e:
        return ("error", e.message, e.location)


@pytest.mark.parametrize("value", GOOD + BAD)
def test_fromjson_same_as_asyncvarlink(value: Any) -> None:
    fast, slow = FlatRecordList(types.FileToPreserve), _generic(types.FileToPreserve)
    assert _outcome(fast.fromjson, value) == _outcome(slow.fromjson, value)


def test_tojson_same_as_asyncvarlink() -> None:
    fast, slow = FlatRecordList(types.FileInfo), _generic(types.FileInfo)
    infos = [types.FileInfo(name=f"f{i}", token=i, size=4096, preservedUSec=i) for i in range(5)]
    assert fast.tojson(infos) == slow.tojson(infos)
    odd: list[Any] = [types.FileInfo(name="x", token="1", size=0, preservedUSec=0)]  # type: ignore[arg-type]
    assert _outcome(fast.tojson, odd) == _outcome(slow.tojson, odd)
    assert _outcome(fast.tojson, [None]) == _outcome(slow.tojson, [None])


def test_same_description_and_in_use() -> None:
    fast, slow = FlatRecordList(types.FileToPreserve), _generic(types.FileToPreserve)
    assert (fast.as_varlink, fast.typedefs) == (slow.as_varlink, slow.typedefs)
    with pytest.raises(TypeError):
        FlatRecordList(types.SessionInfo)  # nested: not flat
    # PreserveFds uses it (if asyncvarlink changed how signatures are kept,
    # this says so rather than the hand-off silently getting slower).
    from asyncvarlink import varlinksignature

    sig = varlinksignature(custody.CustodyInterface.PreserveFds)
    assert sig is not None
    assert "FlatRecordList" in repr(sig.parameter_type)
    assert "FlatRecordList" in repr(sig.return_type)
