"""luod.varlink.transport serves a plain call (method and parameters) of a
method with one reply itself, without asyncvarlink's per-call steps. Each
exchange here goes to a connection served that way and to one served by
asyncvarlink's own path (no plain methods): the replies are the same bytes,
and the fds that came with a call are closed the same."""

# No `from __future__ import annotations`: asyncvarlink reads the test
# interface's signatures at run time.

import array
import asyncio
import collections.abc
import contextlib
import functools
import json
import os
import socket
import typing

import pytest
from asyncvarlink import (
    FileDescriptor,
    TypedVarlinkErrorReply,
    VarlinkInterface,
    VarlinkInterfaceRegistry,
    varlinkmethod,
)

from luod.varlink import transport
from luod.varlink.limits import Limits


class Refused(TypedVarlinkErrorReply, interface="io.luod.Test"):
    class Parameters:
        reason: str


class Padded(typing.TypedDict):
    fileDescriptor: FileDescriptor
    pad: str


class ProbeInterface(VarlinkInterface, name="io.luod.Test"):
    errors = (Refused,)

    def __init__(self) -> None:
        self.taken: list[int] = []
        self.given = 0
        # What came back of replies not delivered (GiveBack), open or not,
        # and how many such replies were delivered.
        self.back: list[tuple[int, bool]] = []
        self.delivered = 0

    @varlinkmethod(return_parameter="text")
    def Echo(self, text: str, times: typing.Optional[int] = None) -> str:  # noqa: UP045
        return text * (1 if times is None else times)

    @varlinkmethod
    def Nothing(self) -> None:
        return None

    @varlinkmethod
    def Refuse(self, reason: str) -> None:
        raise Refused(reason=reason)

    @varlinkmethod
    def Crash(self) -> None:
        raise RuntimeError("a bug")

    @varlinkmethod(return_parameter="size")
    def Take(self, fileDescriptor: int) -> int:
        fd = transport.take_fd(fileDescriptor, "fileDescriptor")
        self.taken.append(fd)
        return os.fstat(fd).st_size

    @varlinkmethod(return_parameter="size")
    def TakeTwice(self, fileDescriptor: int) -> int:
        fd = transport.take_fd(fileDescriptor, "fileDescriptor")
        self.taken.append(fd)
        transport.take_fd(fileDescriptor, "fileDescriptor")  # gone: refused
        return 0

    @varlinkmethod(return_parameter="size")
    def Hold(self, fileDescriptor: FileDescriptor) -> int:
        # An fd typed as asyncvarlink's: its parameters need the call's
        # FileDescriptorArray, so asyncvarlink serves it.
        return os.fstat(fileDescriptor.fileno()).st_size

    @varlinkmethod(return_parameter="fileDescriptor")
    def Give(self, size: int) -> FileDescriptor:
        return self._give(size)

    def _give(self, size: int) -> FileDescriptor:
        self.given += 1
        fd = os.memfd_create("given")
        os.ftruncate(fd, size)
        return transport.reply_fd(fd)

    @varlinkmethod(return_parameter="fileDescriptor")
    def GiveBack(self, size: int) -> FileDescriptor:
        return self._give_back(size)

    @varlinkmethod
    def GiveBackPadded(self, size: int, pad: int) -> Padded:
        return {"fileDescriptor": self._give_back(size), "pad": "p" * pad}

    @varlinkmethod
    def GiveBackBroken(self, size: int) -> Padded:
        # Its reply cannot be said: the fd is converted, then `pad` fails.
        return typing.cast(Padded, {"fileDescriptor": self._give_back(size), "pad": 5})

    def _give_back(self, size: int) -> FileDescriptor:
        out = self._give(size)

        def back(fds: list[int]) -> None:
            for fd in fds:
                self.back.append((fd, fd >= 0 and _is_open(fd)))
                if fd >= 0:
                    os.close(fd)

        def delivered() -> None:
            self.delivered += 1

        transport.on_delivery([out], back, delivered)
        return out

    @varlinkmethod(return_parameter="count")
    def Count(self, upto: int) -> collections.abc.Iterator[int]:
        yield from range(upto)


def _served(
    loop: asyncio.AbstractEventLoop, plain: bool, buffers: int | None = None
) -> tuple[socket.socket, ProbeInterface, transport.LuodTransport]:
    """A connection served, and its client's end; `buffers`: the bytes the
    socket holds each way (so that replies wait in luod)."""
    interface = ProbeInterface()
    registry = VarlinkInterfaceRegistry()
    registry.register_interface(interface)
    methods = transport.PlainMethods(registry if plain else VarlinkInterfaceRegistry())
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if buffers is not None:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
    served = transport.serve_connection(
        loop, ours, functools.partial(transport.LuodProtocol, registry, Limits(), methods)
    )
    theirs.settimeout(10)
    return theirs, interface, served


def _exchange(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, message: object, fds: list[int]
) -> tuple[list[bytes], list[int]]:
    """Send `message` with `fds`; the replies up to the last one (not
    "continues"), and the fds that came with them."""
    cmsg = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([json.dumps(message).encode() + b"\0"], cmsg)

    def receive() -> tuple[list[bytes], list[int]]:
        data, got = b"", array.array("i")
        while True:
            chunk, ancdata, _flags, _ = sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
            for level, kind, raw in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got.frombytes(raw[: len(raw) - len(raw) % got.itemsize])
            assert chunk, "luod closed the connection"
            data += chunk
            replies = data.split(b"\0")[:-1]
            if replies and b'"continues":true' not in replies[-1]:
                return replies, list(got)

    return loop.run_until_complete(loop.run_in_executor(None, receive))


def _run_until(
    loop: asyncio.AbstractEventLoop,
    done: collections.abc.Callable[[], bool],
    deadline: float | None = None,
) -> None:
    """Run `loop` until `done()`: at most 10 s, or until `deadline` (the loop's time)."""
    if deadline is None:
        deadline = loop.time() + 10
    while not done():
        assert loop.time() < deadline
        loop.run_until_complete(asyncio.sleep(0.01))


def _memfd(size: int) -> int:
    fd = os.memfd_create("sent")
    os.ftruncate(fd, size)
    return fd


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def loop() -> collections.abc.Iterator[asyncio.AbstractEventLoop]:
    """An event loop of the test's own, run step by step."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        yield loop
    finally:
        loop.close()
        asyncio.set_event_loop(None)


# An fd left to the garbage collector is closed there with a ResourceWarning:
# an error here.
pytestmark = pytest.mark.filterwarnings(
    "error::ResourceWarning", "error::pytest.PytestUnraisableExceptionWarning"
)

CALLS: list[tuple[str, dict[str, object], int]] = [
    # method, parameters, fds sent
    ("io.luod.Test.Echo", {"text": "ab", "times": 2}, 0),
    ("io.luod.Test.Echo", {"text": "ab"}, 0),
    ("io.luod.Test.Nothing", {}, 0),
    ("io.luod.Test.Echo", {"text": 5}, 0),  # InvalidParameter
    ("io.luod.Test.Echo", {"text": "a", "other": 1}, 0),  # InvalidParameter
    ("io.luod.Test.Echo", {}, 1),  # InvalidParameter; its fd closed
    ("io.luod.Test.Refuse", {"reason": "no"}, 1),
    ("io.luod.Test.Crash", {}, 0),  # InternalServerError
    ("io.luod.Test.Take", {"fileDescriptor": 1}, 2),  # takes one of two
    ("io.luod.Test.Take", {"fileDescriptor": 3}, 1),  # MissingFd: no such fd
    ("io.luod.Test.Take", {"fileDescriptor": -1}, 1),  # MissingFd
    # MissingFd (taken already; not an error of this interface: InternalServerError)
    ("io.luod.Test.TakeTwice", {"fileDescriptor": 0}, 2),
    ("io.luod.Test.Hold", {"fileDescriptor": 1}, 2),  # not a plain method
    ("io.luod.Test.Give", {"size": 8192}, 0),
    ("io.luod.Test.Missing", {}, 0),  # MethodNotFound
    ("io.luod.Nowhere.Echo", {}, 0),  # InterfaceNotFound
    ("io.luod.Test.Count", {"upto": 2}, 0),  # ExpectedMore: not a plain method
]


@pytest.mark.parametrize(("method", "parameters", "nfds"), CALLS)
def test_plain_calls_are_answered_as_asyncvarlink_answers(
    method: str, parameters: dict[str, object], nfds: int, loop: asyncio.AbstractEventLoop
) -> None:
    answers = []
    for plain in (True, False):
        sock, interface, served = _served(loop, plain)
        before = len(os.listdir("/proc/self/fd"))
        sent = [_memfd(4096 * (i + 1)) for i in range(nfds)]
        with contextlib.closing(sock):
            message = {"method": method, "parameters": parameters}
            replies, fds = _exchange(loop, sock, message, sent)
            for fd in sent:
                os.close(fd)
            given = [os.fstat(fd).st_size for fd in fds]
            for fd in fds:
                os.close(fd)
            # What the method took is its own; everything else that came
            # with the call, and what the reply carried, is closed.
            taken = [fd for fd in interface.taken if _is_open(fd)]
            for fd in taken:
                os.close(fd)
            leaked = len(os.listdir("/proc/self/fd")) - before
            answers.append((replies, given, len(taken), leaked))
        served.close()
        loop.run_until_complete(asyncio.sleep(0))
    assert answers[0] == answers[1]
    (replies, given, n_taken, leaked) = answers[0]
    assert len(replies) == 1 and leaked == 0
    reply = json.loads(replies[0])
    assert given == ([8192] if method.endswith(".Give") else [])
    takes = (method.endswith(".Take") and reply.get("parameters")) or method.endswith(".TakeTwice")
    assert n_taken == (1 if takes else 0)
    expected = EXPECTED.get((method, json.dumps(parameters)))
    if expected is not None:
        assert reply == expected


EXPECTED = {
    ("io.luod.Test.Echo", '{"text": "ab", "times": 2}'): {"parameters": {"text": "abab"}},
    ("io.luod.Test.Nothing", "{}"): {},
    ("io.luod.Test.Echo", '{"text": 5}'): {
        "error": "org.varlink.service.InvalidParameter",
        "parameters": {"parameter": "text"},
    },
    ("io.luod.Test.Refuse", '{"reason": "no"}'): {
        "error": "io.luod.Test.Refused",
        "parameters": {"reason": "no"},
    },
    ("io.luod.Test.Crash", "{}"): {"error": "invalid.asyncvarlink.InternalServerError"},
    ("io.luod.Test.Take", '{"fileDescriptor": 1}'): {"parameters": {"size": 8192}},
    ("io.luod.Test.Give", '{"size": 8192}'): {"parameters": {"fileDescriptor": 0}},
    ("io.luod.Test.Hold", '{"fileDescriptor": 1}'): {"parameters": {"size": 8192}},
    ("io.luod.Test.Missing", "{}"): {
        "error": "org.varlink.service.MethodNotFound",
        "parameters": {"method": "Missing"},
    },
}


def test_oneway_more_and_extensions_go_to_asyncvarlink(loop: asyncio.AbstractEventLoop) -> None:
    sock, _interface, served = _served(loop, True)
    with contextlib.closing(sock):
        replies, _ = _exchange(
            loop,
            sock,
            {"method": "io.luod.Test.Count", "parameters": {"upto": 2}, "more": True},
            [],
        )
        assert [json.loads(r) for r in replies] == [
            {"continues": True, "parameters": {"count": 0}},
            {"parameters": {"count": 1}},
        ]
        # A key of its own (an extension): asyncvarlink's path, served.
        replies, _ = _exchange(
            loop, sock, {"method": "io.luod.Test.Echo", "parameters": {"text": "e"}, "x": 1}, []
        )
        assert [json.loads(r) for r in replies] == [{"parameters": {"text": "e"}}]
        # oneway: no reply; the next call's reply is the first to come.
        sock.sendall(
            json.dumps(
                {"method": "io.luod.Test.Echo", "parameters": {"text": "x"}, "oneway": True}
            ).encode()
            + b"\0"
        )
        replies, _ = _exchange(
            loop, sock, {"method": "io.luod.Test.Echo", "parameters": {"text": "y"}}, []
        )
        assert [json.loads(r) for r in replies] == [{"parameters": {"text": "y"}}]
        # parameters not an object: no varlink call; the connection is
        # closed (asyncvarlink answered invalid.asyncvarlink.ProtocolViolation).
        sock.sendall(b'{"method": "io.luod.Test.Nothing", "parameters": []}\0')
        assert loop.run_until_complete(loop.run_in_executor(None, sock.recv, 1)) == b""
    served.close()
    loop.run_until_complete(asyncio.sleep(0))


def test_plain_methods_are_the_single_reply_ones() -> None:
    registry = VarlinkInterfaceRegistry()
    registry.register_interface(ProbeInterface())
    assert sorted(transport.PlainMethods(registry).names()) == [
        "io.luod.Test.Crash",
        "io.luod.Test.Echo",
        "io.luod.Test.Give",
        "io.luod.Test.GiveBack",
        "io.luod.Test.GiveBackBroken",
        "io.luod.Test.GiveBackPadded",
        "io.luod.Test.Nothing",
        "io.luod.Test.Refuse",
        "io.luod.Test.Take",
        "io.luod.Test.TakeTwice",
    ]


def test_plain_methods_are_found_when_first_called_and_keep_no_made_up_name() -> None:
    registry = VarlinkInterfaceRegistry()
    registry.register_interface(ProbeInterface())
    plain = transport.PlainMethods(registry)
    assert plain.get("io.luod.Test.Echo") is plain.get("io.luod.Test.Echo") is not None
    assert plain.get("io.luod.Test.Count") is None  # a `more` method: asyncvarlink's
    for name in ("io.luod.Test.Nope", "io.luod.Test.__init__", "io.luod.Test.echo", "x.Y.Z"):
        assert plain.get(name) is None
    for i in range(1000):
        plain.get(f"io.luod.Test.Made{i}")
    # Only names of served methods are kept: made-up ones would grow it.
    assert plain._found.keys() == {"io.luod.Test.Echo"}
    assert plain._not_plain == {"io.luod.Test.Count"}


# A call served by luod's own path, and one with an extension key (which
# asyncvarlink serves).
GIVE_BACK = [
    {"method": "io.luod.Test.GiveBack", "parameters": {"size": 4096}},
    {"method": "io.luod.Test.GiveBack", "parameters": {"size": 4096}, "x": 1},
]


@pytest.mark.parametrize("call", GIVE_BACK, ids=["plain", "asyncvarlink"])
def test_the_fds_of_a_reply_not_delivered_are_given_back(
    call: dict[str, object], loop: asyncio.AbstractEventLoop
) -> None:
    """A file taken out of custody goes out in a reply: should the reply not
    be delivered, the method has its fds back, still open, instead of their
    being closed with it. Delivered, nothing comes back."""
    sock, interface, served = _served(loop, True)
    with contextlib.closing(sock):
        replies, fds = _exchange(loop, sock, call, [])
        assert len(replies) == 1 and len(fds) == 1
        os.close(fds[0])
        loop.run_until_complete(asyncio.sleep(0.01))
        assert (interface.back, interface.delivered) == ([], 1)
        # The client reads no more: luod's send fails (EPIPE).
        sock.shutdown(socket.SHUT_RD)
        sock.sendall(json.dumps(call).encode() + b"\0")
        _run_until(loop, lambda: bool(interface.back))
        assert [is_open for _fd, is_open in interface.back] == [True]
        assert interface.delivered == 1
    served.close()
    loop.run_until_complete(asyncio.sleep(0))

    # A reply waiting in luod (the client reads nothing) when the
    # connection is dropped.
    sock, interface, served = _served(loop, True, buffers=4096)
    with contextlib.closing(sock):
        big = {"method": "io.luod.Test.Echo", "parameters": {"text": "a", "times": 200_000}}
        sock.sendall(json.dumps(big).encode() + b"\0" + json.dumps(call).encode() + b"\0")
        deadline = loop.time() + 10  # for both waits
        _run_until(loop, lambda: interface.given >= 1, deadline)
        loop.run_until_complete(asyncio.sleep(0.01))
        assert interface.back == []  # waiting to be sent
        served.abort()
        _run_until(loop, lambda: bool(interface.back), deadline)
        assert [is_open for _fd, is_open in interface.back] == [True]
        assert interface.delivered == 0
    loop.run_until_complete(asyncio.sleep(0))


@pytest.mark.parametrize("extension", [{}, {"x": 1}], ids=["plain", "asyncvarlink"])
def test_a_reply_is_delivered_once_its_fds_went_out(
    extension: dict[str, object], loop: asyncio.AbstractEventLoop
) -> None:
    """The fds of a reply go with its first bytes the socket takes: from
    then on it is delivered, though its rest, and replies after it, wait in
    luod and are lost with the connection. Nothing is given back then: the
    client has the file."""
    sock, interface, served = _served(loop, True, buffers=4096)
    with contextlib.closing(sock):
        # 20 KB: sent in part at once (its fds with it), the rest queued;
        # the next reply joins the rest in asyncvarlink's queue.
        take = {
            "method": "io.luod.Test.GiveBackPadded",
            "parameters": {"size": 8192, "pad": 20_000},
            **extension,
        }
        big = {"method": "io.luod.Test.Echo", "parameters": {"text": "a", "times": 300_000}}
        sock.sendall(json.dumps(take).encode() + b"\0" + json.dumps(big).encode() + b"\0")
        sock.setblocking(False)
        data, got = b"", array.array("i")
        deadline = loop.time() + 10
        while b"\0" not in data:  # the take's reply, read whole
            assert loop.time() < deadline
            try:
                chunk, ancdata, _flags, _ = sock.recvmsg(1, socket.CMSG_SPACE(4 * 4))
            except BlockingIOError:
                loop.run_until_complete(asyncio.sleep(0.005))
                continue
            data += chunk
            for _level, _kind, raw in ancdata:
                got.frombytes(raw[: len(raw) - len(raw) % got.itemsize])
        assert len(got) == 1 and os.fstat(got[0]).st_size == 8192
        os.close(got[0])
    # The client went, the Echo's reply unread.
    _run_until(loop, served.is_closing)
    loop.run_until_complete(asyncio.sleep(0.05))
    assert (interface.back, interface.delivered) == ([], 1)


@pytest.mark.parametrize(
    ("extension", "still_open"), [({}, True), ({"x": 1}, False)], ids=["plain", "asyncvarlink"]
)
def test_what_a_call_handed_over_comes_back_if_its_reply_cannot_be_made(
    extension: dict[str, object], still_open: bool, loop: asyncio.AbstractEventLoop
) -> None:
    """A reply that cannot be said (a bug) goes out as an error: what the
    method handed over comes back, still open on luod's own path (on
    asyncvarlink's the conversion closed it first: reported, -1)."""
    sock, interface, served = _served(loop, True)
    with contextlib.closing(sock):
        call = {"method": "io.luod.Test.GiveBackBroken", "parameters": {"size": 1}, **extension}
        replies, fds = _exchange(loop, sock, call, [])
        assert [json.loads(r)["error"] for r in replies] == [
            "invalid.asyncvarlink.InternalServerError"
        ]
        assert fds == []
        assert [is_open for _fd, is_open in interface.back] == [still_open]
        assert interface.delivered == 0
    served.close()
    loop.run_until_complete(asyncio.sleep(0))


def test_a_oneway_call_whose_reply_carries_fds_is_refused(loop: asyncio.AbstractEventLoop) -> None:
    """A oneway call gets no reply: a method that hands out fds is not
    called (a taken file would be lost), and the connection is closed."""
    sock, interface, served = _served(loop, True)
    with contextlib.closing(sock):
        sent = _memfd(4096)
        oneway = {"method": "io.luod.Test.Give", "parameters": {"size": 1}, "oneway": True}
        message = json.dumps(oneway).encode() + b"\0"
        cmsg = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [sent]))]
        before = len(os.listdir("/proc/self/fd"))
        sock.sendmsg([message], cmsg)
        os.close(sent)
        assert loop.run_until_complete(loop.run_in_executor(None, sock.recv, 1)) == b""
        assert interface.given == 0
        # The fd luod received closed too: what is gone is the one sent
        # (closed here) and luod's end of the connection.
        assert len(os.listdir("/proc/self/fd")) == before - 2
    served.close()
    loop.run_until_complete(asyncio.sleep(0))


def test_a_reply_with_no_connection_left_gives_back_what_it_hands_over() -> None:
    """Served after its connection went (no transport): nothing goes out."""

    async def run() -> list[tuple[bool, bool]]:
        protocol = transport.LuodProtocol(VarlinkInterfaceRegistry(), Limits())
        fd = _memfd(4096)
        back: list[tuple[bool, bool]] = []
        fut = protocol._send_json({}, [fd], False, lambda went: back.append((went, _is_open(fd))))
        with pytest.raises(BrokenPipeError):
            await fut
        await asyncio.sleep(0)
        os.close(fd)
        return back

    assert asyncio.run(run()) == [(False, True)]
