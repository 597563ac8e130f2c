"""testsupport.util's run_as and fd_is_open, which the tests of other
users and of closed fds stand on."""

from __future__ import annotations

import os

import pytest

from testsupport.util import ChildFailed, fd_is_open, run_as


def test_run_as_returns_the_childs_json_result() -> None:
    parent = os.getpid()
    got = run_as(os.getuid(), lambda: {"child": os.getpid() != parent, "n": [1, "x"]})
    assert got == {"child": True, "n": [1, "x"]}


@pytest.mark.skipif(os.getuid() != 0, reason="dropping to another uid needs root")
def test_run_as_drops_uid_gid_and_groups() -> None:
    assert run_as(65534, lambda: [os.getuid(), os.getgid(), os.getgroups()]) == [65534, 65534, []]
    assert os.getuid() == 0  # the parent is unchanged


def test_run_as_raises_with_the_childs_traceback() -> None:
    def fail() -> None:
        raise ValueError("in the child")

    with pytest.raises(ChildFailed, match=r"(?s)Traceback.*ValueError: in the child"):
        run_as(os.getuid(), fail)
    with pytest.raises(ChildFailed, match="not JSON serializable"):
        run_as(os.getuid(), object)


def test_fd_is_open() -> None:
    r, w = os.pipe()
    assert fd_is_open(r) and fd_is_open(w)
    os.close(r)
    os.close(w)
    assert not fd_is_open(r) and not fd_is_open(-1)
