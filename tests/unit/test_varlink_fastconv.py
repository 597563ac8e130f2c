"""luod.varlink.fastconv converts exactly as asyncvarlink does, only quicker."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import pytest
from asyncvarlink import FileDescriptor, FileDescriptorArray
from asyncvarlink.conversion import (
    ConversionError,
    DataclassVarlinkType,
    FileDescriptorVarlinkType,
    ListVarlinkType,
)

from luod.varlink import custody, types
from luod.varlink.fastconv import FdRecordList, FlatRecordList

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
    [{"name": "a", "fd": 0}],  # as many keys, one of them unknown
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


def _retrieved(n: int) -> list[types.RetrievedFile]:
    return [
        types.RetrievedFile(
            # Not the reply's to close: converted twice, closed by the test.
            fileDescriptor=FileDescriptor(os.memfd_create(f"f{i}")),
            file=types.FileInfo(name=f"f{i}", token=i + 1, size=4096, preservedUSec=i),
        )
        for i in range(n)
    ]


def _tojson_with_fds(conv: ListVarlinkType, value: Any) -> tuple[Any, list[int]]:
    """What a reply says, and the fds (numbers) it sends, in order."""
    with FileDescriptorArray.new_managed() as fds:
        try:
            said = _outcome(lambda v: conv.tojson(v, {FileDescriptorVarlinkType: fds}), value)
            return said, [fd.fileno() for fd in fds]
        finally:
            fds.destroy()


def test_fd_records_tojson_same_as_asyncvarlink() -> None:
    fast, slow = FdRecordList(types.RetrievedFile), _generic(types.RetrievedFile)
    for n in (0, 1, 253):
        records = _retrieved(n)
        try:
            assert _tojson_with_fds(fast, records) == _tojson_with_fds(slow, records)
            said, fds = _tojson_with_fds(fast, records)
            assert said[1][-1:] == (
                [{"fileDescriptor": n - 1, "file": dataclasses.asdict(records[-1].file)}]
                if n
                else []
            )
            assert fds == [r.fileDescriptor.fileno() for r in records]
        finally:
            for r in records:
                os.close(r.fileDescriptor.fileno())
    # Anything unusual goes the generic way, and fails (or not) as it does.
    odd: list[Any] = [
        [None],
        [types.RetrievedFile(fileDescriptor=-1, file=types.FileInfo("x", 1, 0, 0))],  # type: ignore[arg-type]
        [types.RetrievedFile(FileDescriptor(None), types.FileInfo("x", 1, 0, 0))],
        [types.RetrievedFile(FileDescriptor(None), types.FileInfo("x", "1", 0, 0))],  # type: ignore[arg-type]
    ]
    for value in odd:
        assert _tojson_with_fds(fast, value) == _tojson_with_fds(slow, value), value


def test_fd_records_description_and_in_use() -> None:
    fast, slow = FdRecordList(types.RetrievedFile), _generic(types.RetrievedFile)
    assert (fast.as_varlink, fast.typedefs) == (slow.as_varlink, slow.typedefs)
    with pytest.raises(TypeError):
        FdRecordList(types.SessionInfo)  # a list inside: not flat
    from asyncvarlink import varlinksignature

    sig = varlinksignature(custody.CustodyInterface.RetrieveFds)
    assert sig is not None
    assert "FdRecordList" in repr(sig.return_type)


def test_fd_records_fast_with_a_plain_calls_reply_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain call's reply state (transport._ReplyFds) makes its fd array
    when the first fd is converted: FdRecordList finds it there and stays
    on its one pass, without asyncvarlink's conversion."""
    from asyncvarlink.conversion import ListVarlinkType

    from luod.varlink.transport import _REPLY_FDS, _ReplyFds

    def generic(*args: object) -> None:
        raise AssertionError("asyncvarlink's conversion")

    monkeypatch.setattr(ListVarlinkType, "tojson", generic)
    records = _retrieved(3)
    oob = _ReplyFds()
    try:
        said = FdRecordList(types.RetrievedFile).tojson(records, oob)
        array = oob[FileDescriptorVarlinkType]
        assert [d["fileDescriptor"] for d in said] == [0, 1, 2]
        assert [fd.fileno() for fd in array] == [r.fileDescriptor.fileno() for r in records]
        array.release(_REPLY_FDS)  # closes them, as a sent reply does
    finally:
        for r in records:
            with contextlib.suppress(OSError):
                os.close(r.fileDescriptor.fileno())
