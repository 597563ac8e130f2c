"""luod.service: which passed fd is the varlink socket, and that it listens."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from luod.notify import ListenFd
from luod.service import check_varlink_socket, listen_socket, split_listen_fds


def test_named_varlink_socket_is_picked() -> None:
    fds = [ListenFd(3, "session.a"), ListenFd(4, "varlink"), ListenFd(5, "luod-manifest-a")]
    varlink, rest = split_listen_fds(fds)
    assert varlink == fds[1]
    assert rest == [fds[0], fds[2]]


@pytest.mark.parametrize("name", ["unknown", ""])
def test_lone_unnamed_fd_is_the_socket(name: str) -> None:
    fd = ListenFd(3, name)
    assert split_listen_fds([fd]) == (fd, [])


def test_no_varlink_socket() -> None:
    fds = [ListenFd(3, "session.a")]
    assert split_listen_fds(fds) == (None, fds)
    two = [ListenFd(3, "unknown"), ListenFd(4, "unknown")]
    assert split_listen_fds(two) == (None, two)


def test_listening_socket_is_accepted(tmp_path: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "s"))
    s.listen()
    with s:
        check_varlink_socket(ListenFd(s.fileno(), "varlink"))


def test_connected_socket_is_refused() -> None:
    a, b = socket.socketpair()
    b.close()
    fd = a.detach()
    with pytest.raises(SystemExit, match="not a listening socket"):
        check_varlink_socket(ListenFd(fd, "varlink"))
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: luod does not keep it


def test_no_socket_at_all_is_refused(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    with pytest.raises(SystemExit, match="Accept=no"):
        check_varlink_socket(ListenFd(fd, "varlink"))


def test_listen_socket_binds_path(tmp_path: Path) -> None:
    path = tmp_path / "run" / "io.luod"
    with listen_socket(None, str(path)) as s:
        assert s.getsockname() == str(path)
        assert path.stat().st_mode & 0o777 == 0o666
    # A stale socket of an earlier run is replaced.
    with listen_socket(None, str(path)) as s:
        assert s.getsockname() == str(path)
