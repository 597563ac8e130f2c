"""The fds that come with a call, and those luod's replies carry: each is
closed by luod as soon as it has no more use for it, whatever the method
and however the client behaves. A pipe's write end sent to luod shows it:
once the client has closed its own copy, the read end sees EOF only when
luod has closed its copy too."""

from __future__ import annotations

import json
import os
import select
import socket
from typing import Any

from testsupport.luodproc import LuodProcess

SUBSCRIBE = "io.luod.Manager.Subscribe"


def sees_eof(read_end: int, timeout: float = 2.0) -> bool:
    """True once every write end of the pipe is closed, within `timeout`."""
    if not select.select([read_end], [], [], timeout)[0]:
        return False
    return os.read(read_end, 1) == b""


def call_with_fds(s: socket.socket, message: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    """Send `message` with `fds`; its first reply."""
    socket.send_fds(s, [json.dumps(message).encode() + b"\0"], fds)
    data = b""
    while b"\0" not in data:
        chunk = s.recv(65536)
        assert chunk, "luod closed the connection"
        data += chunk
    reply: dict[str, Any] = json.loads(data.split(b"\0")[0])
    return reply


def test_fds_sent_with_a_subscription_are_closed_at_once(luod: LuodProcess) -> None:
    """Subscribe takes no fd; the fds that came with it stayed open in luod
    for as long as the subscription lasted: 253 a call, 16 subscriptions a
    uid, past the quota on files."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.connect(luod.socket)
    s.settimeout(10)
    try:
        reply = call_with_fds(
            s, {"method": SUBSCRIBE, "parameters": {"name": "fds"}, "more": True}, [write_end]
        )
        assert reply["parameters"]["event"]["phase"] == "subscribed"
        os.close(write_end)
        assert sees_eof(read_end), "luod still holds the fd sent with Subscribe"
        with luod.client() as c:
            assert [sub["name"] for sub in c.status()["subscribers"]] == ["fds"]
    finally:
        s.close()
        os.close(read_end)
