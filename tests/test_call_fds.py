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

from luod.varlink.limits import MAX_FDS_PER_MESSAGE
from testsupport.luodproc import LuodProcess
from testsupport.util import make_memfd, wait_until

SUBSCRIBE = "io.luod.Manager.Subscribe"
RETRIEVE_FD = "io.luod.Custody.RetrieveFd"


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


def test_replies_carrying_fds_wait_for_a_client_that_does_not_read_within_a_bound(
    luod: LuodProcess,
) -> None:
    """RetrieveFd (copies) pipelined without reading a reply: each reply
    carries a new fd of luod's until it is sent. Only the bytes waiting
    were bounded (1 MiB): a connection held 9,000 of luod's fds, so one
    uid's 128 connections more than luod's LimitNOFILE. At most one full
    reply's worth of fds (SCM_MAX_FD) waits now; past it the client is cut
    off, as past the bytes, and its fds closed."""
    memfd = make_memfd(b"held")
    with luod.client() as c:
        c.preserve_fd("s", "f", memfd, create_session=True)
        os.close(memfd)
        c.status()
        baseline = luod.fd_count()
        call = json.dumps(
            {"method": RETRIEVE_FD, "parameters": {"session": "s", "name": "f"}}
        ).encode()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(luod.socket)
        s.setblocking(False)
        peak = 0
        cut_off = False
        try:
            for _ in range(200):
                try:
                    s.send((call + b"\0") * 100)
                except BlockingIOError:
                    select.select([], [s], [], 0.05)
                except (BrokenPipeError, ConnectionResetError):
                    cut_off = True
                    break
                peak = max(peak, luod.fd_count() - baseline)
            peak = max(peak, luod.fd_count() - baseline)
        finally:
            s.close()
        print(f"\nluod's fds over its baseline at most {peak}; cut off: {cut_off}")
        # The connection itself, at most SCM_MAX_FD fds waiting in replies,
        # and the copy made for the reply that is then refused (the method
        # makes it before the transport sees the reply).
        assert peak <= 2 + MAX_FDS_PER_MESSAGE
        assert cut_off
        wait_until(lambda: luod.fd_count() == baseline, "luod closed the fds of the replies")
        c.status()
    assert "event=client-not-reading" in luod.log()
