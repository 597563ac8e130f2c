"""luod.varlink.limits and how luod.varlink.transport frames messages: what
a message may be, the connection caps, the rate of log lines, idleness."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import time
from collections.abc import Callable

import pytest
from asyncvarlink import VarlinkInterfaceRegistry

from luod import daemon
from luod.varlink import limits
from luod.varlink.limits import (
    MAX_DEPTH,
    ConnectionCounts,
    Limits,
    ProtocolViolation,
    RateLimit,
    Transit,
    TransitBytes,
    TransitFds,
    decode_message,
)
from luod.varlink.transport import LuodProtocol, serve_connection


def nested(levels: int) -> bytes:
    return b'{"method":"m","parameters":{"x":' + b"[" * levels + b"]" * levels + b"}}"


def test_a_message_is_a_json_object() -> None:
    assert decode_message(b'{"method":"a.b.C","parameters":{}}') == {
        "method": "a.b.C",
        "parameters": {},
    }


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"method":"\xff"}', "not UTF-8 (byte 11)"),
        (b'{"method":', "not JSON"),
        (b"", "not JSON"),
        (b'{"x":NaN}', "not JSON (NaN is not JSON)"),
        (b"[1]", "a JSON list, not an object"),
        (b'"s"', "a JSON str, not an object"),
        (nested(MAX_DEPTH), f"nested more than {MAX_DEPTH} deep"),
        (nested(100_000), f"nested more than {MAX_DEPTH} deep"),  # RecursionError
    ],
)
def test_what_is_no_message(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolViolation) as e:
        decode_message(data)
    assert str(e.value).startswith(reason)


def test_nesting_up_to_the_limit_and_brackets_in_strings_pass() -> None:
    # The object and "parameters" are two levels.
    assert decode_message(nested(MAX_DEPTH - 2))["method"] == "m"
    text = b'{"method":"m","parameters":{"x":"' + b"[" * 5000 + b'"}}'
    assert decode_message(text)["parameters"]["x"] == "[" * 5000
    wide = b'{"files":[' + b",".join([b'{"a":[1]}'] * 300) + b"]}"
    assert len(decode_message(wide)["files"]) == 300


def test_message_buffer_bounds_bytes_and_fds() -> None:
    buf = limits.MessageBuffer()
    assert not buf.add(memoryview(b'{"a":'), [], False)
    assert buf.add(memoryview(b"1}\0"), [], True)
    assert buf.take() == (b'{"a":1}', [], True)
    fds = [os.memfd_create("t") for _ in range(limits.MAX_FDS_PER_MESSAGE + 1)]
    assert not buf.add(memoryview(b"{"), fds[:200], False)
    with pytest.raises(ProtocolViolation, match="more than 253 fds"):
        buf.add(memoryview(b" "), fds[200:], False)
    buf.drop()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed with the message
    chunk = memoryview(b" " * (1024 * 1024))
    with pytest.raises(ProtocolViolation, match="longer than 16777216 bytes"):
        for _ in range(17):
            buf.add(chunk, [], False)


def test_connection_caps() -> None:
    counts = ConnectionCounts(Limits(max_connections=6, reserved_for_root=2, max_per_user=3))
    assert [counts.admit(1000) for _ in range(4)][-1] == "max-connections-per-user=3"
    assert counts.admit(1001) is None
    # 4 of 6 open: the rest is root's.
    assert counts.admit(1002) == "max-connections=6 (of which 2 reserved for root)"
    assert counts.admit(0) is None
    assert counts.admit(0) is None
    assert counts.admit(0) == "max-connections=6"
    counts.release(0)
    counts.release(0)
    counts.release(1000)
    assert counts.admit(1002) is None  # 3 of the 4 anyone but root may use were taken
    assert counts.admit(1002) == "max-connections=6 (of which 2 reserved for root)"
    assert counts.total == 4 and counts.by_uid == {1000: 2, 1001: 1, 1002: 1}


@pytest.mark.parametrize("kind", [TransitFds, TransitBytes])
def test_transit_caps(kind: type[TransitFds | TransitBytes]) -> None:
    what = "fds" if kind is TransitFds else "bytes"
    transit = kind(
        Limits(
            **{
                f"max_transit_{what}": 1000,
                f"transit_{what}_reserved_for_root": 300,
                f"max_transit_{what}_per_user": 400,
            }
        )
    )
    assert transit.take(1000, 253) is None
    assert transit.take(1000, 253) == f"max-transit-{what}-per-user=400"
    assert transit.take(1000, 147) is None  # up to the cap
    assert transit.take(1001, 253) is None
    # 653 in transit: 47 more of the 700 anyone but root may use.
    assert transit.take(1002, 48) == f"max-transit-{what}=1000 (of which 300 reserved for root)"
    assert transit.take(0, 253) is None
    assert transit.take(0, 95) == f"max-transit-{what}=1000"
    assert transit.take(0, 94) is None
    transit.give_back(0, 347)
    transit.give_back(1000, 400)
    assert transit.total == 253 and transit.by_uid == {1001: 253}


def test_default_transit_byte_caps() -> None:
    """Two of the largest messages per uid; 512 MiB in all, four of the
    largest messages of it root's alone."""
    assert Limits().max_transit_bytes_per_user == 32 << 20
    assert Limits().max_transit_bytes == 512 << 20
    assert Limits().transit_bytes_reserved_for_root == 64 << 20


def bytes_capped_at(n: int) -> Transit:
    """What is in transit, `n` bytes of it for anyone (the tests' uid may be
    root's), fds as by default."""
    return Transit(
        Limits(max_transit_bytes=n, transit_bytes_reserved_for_root=0, max_transit_bytes_per_user=n)
    )


def test_bytes_of_messages_begun_are_counted_until_served_or_dropped() -> None:
    """One uid's 128 connections each with a message of 16 MiB begun took
    luod's memory to 2 GiB: the bytes of a message not yet whole count for
    its uid until it is served or dropped; a connection whose chunk would
    go over the cap is closed, and what it kept is given back. A message
    read whole at once is never counted."""
    uid = os.getuid()
    both = bytes_capped_at(1000)
    transit = both.bytes

    async def run() -> None:
        (theirs1, recorder1), (theirs2, _) = served(both), served(both)
        theirs1.sendall(b'{"x":"' + b"a" * 594)  # 600 bytes, no NUL
        await until(lambda: transit.total == 600)
        assert transit.by_uid == {uid: 600}
        theirs2.sendall(b'{"y":"' + b"b" * 394)  # 400 more: at the cap, not over
        await until(lambda: transit.total == 1000)
        theirs2.sendall(b"b")
        theirs2.settimeout(10)
        assert await asyncio.to_thread(theirs2.recv, 1) == b""  # closed
        assert transit.by_uid == {uid: 600}
        theirs1.sendall(b'"}\0')
        await until(lambda: len(recorder1.frames) == 1)
        assert recorder1.frames[0][0] == b'{"x":"' + b"a" * 594 + b'"}'
        assert transit.total == 0 and not transit.by_uid
        # Whole at once, larger than the cap: never counted.
        theirs1.sendall(b'{"z":"' + b"c" * 2000 + b'"}\0')
        await until(lambda: len(recorder1.frames) == 2)
        assert transit.total == 0
        theirs1.sendall(b'{"x":')
        await until(lambda: transit.total == 5)
        theirs1.close()  # the message is dropped with the connection
        await until(lambda: transit.total == 0)
        theirs2.close()

    asyncio.run(run())


def test_bytes_of_replies_not_read_are_counted_until_sent_or_dropped() -> None:
    """A reply the client does not read waits in luod: counted for its uid
    from when it is queued until it is sent or dropped with the connection;
    a connection whose reply would go over is cut off."""
    uid = os.getuid()
    both = bytes_capped_at(200_000)
    transit = both.bytes
    reply = b"r" * 100_000

    async def run() -> None:
        loop = asyncio.get_running_loop()
        pairs = [socket.socketpair() for _ in range(3)]
        transports = []
        for ours, theirs in pairs:
            # The socket takes little: most of a reply waits in luod.
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            transports.append(serve_connection(loop, ours, Recorder, both))
        await asyncio.sleep(0)  # connection_made
        transports[0].send_message(reply)
        transports[1].send_message(reply)
        waiting = transit.total
        assert 2 * 100_000 - 50_000 < waiting <= 2 * 100_000
        assert transit.by_uid == {uid: waiting}
        # A third would take it over 200,000 (the tests' uid may be root's:
        # the cap in all): cut off.
        refused = transports[2].send_message(reply)
        with pytest.raises(BrokenPipeError):
            await asyncio.wait_for(refused, 10)
        await until(transports[2].is_closing)
        assert transit.total == waiting
        # Read, the first reply is given back as it goes.
        theirs = pairs[0][1]
        got = 0
        while got < len(reply):
            got += len(await asyncio.to_thread(theirs.recv, 65536))
        await until(lambda: transit.total < waiting - 50_000)
        # Dropped with its connection, the second is given back whole.
        transports[1].abort()
        await until(lambda: transit.total == 0)
        assert not transit.by_uid
        transports[0].close()
        for _ours, theirs in pairs:
            theirs.close()
        await asyncio.sleep(0.01)

    asyncio.run(run())


def test_default_transit_fd_caps_leave_a_reserve_for_root() -> None:
    # A quarter of luod.service's LimitNOFILE, an eighth of it root's alone.
    assert limits.default_max_transit_fds(262144) == 65536 == Limits().max_transit_fds
    assert limits.default_transit_fds_reserved_for_root(65536) == 8192
    assert Limits().transit_fds_reserved_for_root == 8192
    assert Limits().max_transit_fds_per_user == 1024
    # However low the open-file limit, a whole message for root and one
    # for everyone else.
    assert limits.default_max_transit_fds(200) == 506
    assert limits.default_transit_fds_reserved_for_root(506) == 253
    got = daemon.connection_limits(daemon.build_parser().parse_args([]))
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert got.max_transit_fds == max(506, nofile // 4)
    assert got.transit_fds_reserved_for_root == max(253, got.max_transit_fds // 8)


def test_rate_limit_reports_what_it_held_back() -> None:
    rate = RateLimit(burst=2, interval=10.0)
    assert [rate.allow(t) for t in (0.0, 1.0, 2.0, 3.0, 9.0)] == [0, 0, None, None, None]
    assert rate.allow(10.0) == 3
    assert rate.allow(11.0) == 0


def test_default_connection_cap_leaves_the_fds_to_custody() -> None:
    assert limits.default_max_connections(131072) == 4096
    assert limits.default_max_connections(1024) == 256
    args = daemon.build_parser().parse_args([])
    got = daemon.connection_limits(args)
    assert got.reserved_for_root == got.max_connections // 8
    assert got.max_per_user == 128 and got.idle_timeout == 30.0
    args = daemon.build_parser().parse_args(
        ["--max-connections=10", "--connections-reserved-for-root=10"]
    )
    with pytest.raises(SystemExit, match="leaves no connection"):
        daemon.connection_limits(args)


# --- framing -----------------------------------------------------------------


class Recorder(LuodProtocol):
    """Records what LuodTransport frames, instead of serving it."""

    def __init__(self) -> None:
        super().__init__(VarlinkInterfaceRegistry(), Limits(idle_timeout=0))
        self.frames: list[tuple[bytes, int]] = []

    def frame_received(self, data: bytes, fds: list[int], dropped: bool) -> None:
        self.frames.append((data, len(fds)))
        limits.close_fds(fds)


def frames_of(send: list[tuple[bytes, list[int]]], count: int) -> list[tuple[bytes, int]]:
    """What luod's transport makes of `send` (data and fds of each sendmsg)."""

    def sender(sock: socket.socket) -> None:
        with sock:
            for data, fds in send:
                if fds:
                    socket.send_fds(sock, [data], fds)
                else:
                    sock.sendall(data)

    async def run() -> list[tuple[bytes, int]]:
        ours, theirs = socket.socketpair()
        recorder = Recorder()
        transport = serve_connection(asyncio.get_running_loop(), ours, lambda: recorder)
        await asyncio.to_thread(sender, theirs)
        deadline = time.monotonic() + 10
        while len(recorder.frames) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        transport.close()
        await asyncio.sleep(0)
        return recorder.frames

    return asyncio.run(run())


def test_a_long_message_keeps_its_fds_and_is_read_in_linear_time() -> None:
    """A message longer than one peek (256 KiB), its fds sent with its first
    bytes: they stay with it. 15 MiB sent in 64 KiB writes is read in one
    pass (asyncvarlink joined the whole buffer again per chunk)."""
    memfd = os.memfd_create("t")
    body = b"1" * (15 * 1024 * 1024)
    send = [(b'{"x":', [memfd] * 3)]
    send += [(body[i : i + 65536], []) for i in range(0, len(body), 65536)]
    send += [(b"}\0{}\0", [])]
    start = time.perf_counter()
    frames = frames_of(send, 2)
    elapsed = time.perf_counter() - start
    os.close(memfd)
    assert [(len(data), fds) for data, fds in frames] == [(len(body) + 6, 3), (2, 0)]
    assert frames[0][0].startswith(b'{"x":111') and frames[1][0] == b"{}"
    assert elapsed < 5.0, elapsed


def served(transit: Transit) -> tuple[socket.socket, Recorder]:
    """A connection luod's transport serves, counting in `transit`: the
    client's end and what the transport frames."""
    ours, theirs = socket.socketpair()
    recorder = Recorder()
    serve_connection(asyncio.get_running_loop(), ours, lambda: recorder, transit)
    return theirs, recorder


async def until(done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not done():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


def test_fds_in_transit_are_counted_until_served_or_dropped() -> None:
    """The fds of a message begun count for its uid until the message is
    whole (served) or dropped; a connection whose chunk would go over the
    cap is closed with its fds, and what it held is given back."""
    memfd = os.memfd_create("t")
    uid = os.getuid()
    both = Transit(
        Limits(max_transit_fds=300, transit_fds_reserved_for_root=0, max_transit_fds_per_user=300)
    )
    transit = both.fds

    async def run() -> None:
        (theirs1, recorder1), (theirs2, _) = served(both), served(both)
        socket.send_fds(theirs1, [b'{"x":'], [memfd] * 200)
        await until(lambda: transit.total == 200)
        assert transit.by_uid == {uid: 200}
        socket.send_fds(theirs2, [b'{"x":'], [memfd] * 101)
        theirs2.settimeout(10)
        assert await asyncio.to_thread(theirs2.recv, 1) == b""  # closed
        assert transit.by_uid == {uid: 200}
        theirs1.sendall(b"1}\0")
        await until(lambda: recorder1.frames == [(b'{"x":1}', 200)])
        assert transit.total == 0 and not transit.by_uid
        socket.send_fds(theirs1, [b'{"x":'], [memfd] * 100)
        await until(lambda: transit.total == 100)
        theirs1.close()  # the message is dropped with the connection
        await until(lambda: transit.total == 0)
        theirs2.close()

    asyncio.run(run())
    os.close(memfd)
