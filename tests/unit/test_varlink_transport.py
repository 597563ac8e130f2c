"""luod.varlink.transport: fds of a call are taken by index, once each, and a
bad index is a named error with its parameter."""

from __future__ import annotations

import contextlib
import os
import re
import resource
from collections.abc import Iterator
from typing import cast

import pytest
from asyncvarlink import FileDescriptorArray, varlinksignature

from luod import errors
from luod.peer import Peer
from luod.varlink import transport
from luod.varlink.custody import CustodyInterface
from luod.varlink.manager import ManagerInterface

CALLER = Peer(pid=3, uid=1000, gid=1000, comm="svc")


@contextlib.contextmanager
def call_with(fds: list[int], dropped: bool = False) -> Iterator[FileDescriptorArray]:
    array = FileDescriptorArray(None, fds)
    ctx = transport.CallContext(CALLER, array, cast(transport.LuodProtocol, None), dropped)
    token = transport._current.set(ctx)
    try:
        yield array
    finally:
        transport._current.reset(token)
        array.destroy()


def test_take_fd_hands_over_each_fd_once() -> None:
    r, w = os.pipe()
    with call_with([r, w]):
        assert transport.current().peer == CALLER
        assert transport.take_fd(1, "fileDescriptor") == w
        with pytest.raises(errors.MissingFd) as e:
            transport.take_fd(1, "files[1].fileDescriptor")
        assert e.value.parameters == {"parameter": "files[1].fileDescriptor", "index": 1}
        with pytest.raises(errors.MissingFd):
            transport.take_fd(-1, "fileDescriptor")
    # The taken fd is the caller's now; the other was closed with the call.
    os.fstat(w)
    with pytest.raises(OSError):
        os.fstat(r)
    os.close(w)


def test_a_dropped_fd_is_named_for_the_open_file_limit() -> None:
    with call_with([], dropped=True), pytest.raises(errors.TooManyOpenFiles) as e:
        transport.take_fd(0, "fileDescriptor")
    assert e.value.limit == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    with call_with([]), pytest.raises(errors.MissingFd):
        transport.take_fd(0, "fileDescriptor")


def test_only_methods_served_in_one_step_take_fds() -> None:
    """LuodProtocol closes the fds a call came with once its method has been
    called (take_fd), before an asynchronous or `more` method runs: such a
    method must take none."""
    taking = set()
    for interface in (CustodyInterface, ManagerInterface):
        for name in dir(interface):
            signature = varlinksignature(getattr(interface, name)) if name[:1].isupper() else None
            if signature is None:
                continue
            takes_fds = re.search(r"\b(fileDescriptor|files):", signature.parameter_type.as_varlink)
            if takes_fds:
                taking.add(name)
            if signature.asynchronous or signature.more:
                assert not takes_fds, f"{interface.name}.{name}"
    assert taking == {"AdoptSession", "PreserveFd", "PreserveFds"}
