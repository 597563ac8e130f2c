from __future__ import annotations

import os
import socket

import pytest

from luod.peer import peer_of_socket, unit_of_cgroup


@pytest.mark.parametrize(
    ("text", "unit"),
    [
        ("0::/system.slice/db.service\n", "db.service"),
        ("0::/system.slice/db.service/worker\n", "db.service"),
        ("0::/user.slice/user-1000.slice/session-3.scope\n", "session-3.scope"),
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/x.service\n", "x.service"),
        ("0::/system.slice\n", None),
        ("0::/\n", None),
        ("12:pids:/system.slice/old.service\n", None),  # cgroup v1 lines are not read
        ("", None),
    ],
)
def test_unit_of_cgroup(text: str, unit: str | None) -> None:
    assert unit_of_cgroup(text) == unit


def test_peer_of_socket_is_this_process() -> None:
    a, b = socket.socketpair()
    with a, b:
        peer = peer_of_socket(a)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert peer.comm
