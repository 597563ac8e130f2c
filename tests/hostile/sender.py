"""Sending hostile messages to luod, as root or as uid 65534, and tallying
what comes back.

A batch runs in a forked child (which drops to uid 65534 first when it
sends as nobody), makes the fds each message names, sends, reads, and hands
its `Tally` back through a pipe as JSON. CALL messages share a connection
and get one reply each; when luod closes it, the next message opens another.
ALONE messages each get a connection of their own: sent, the write side
shut, and every reply read until luod closes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import socket
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from tests.hostile.generator import Message, Mode
from testsupport.util import run_as

NOBODY = 65534
ISE = "invalid.asyncvarlink.InternalServerError"
# Longer than any reply luod owes, short enough that a hung connection
# does not stall the tier.
REPLY_TIMEOUT = 5.0
# Under a message (so its fds ride with its first bytes), above the
# largest hostile message but the oversized ones.
FIRST_CHUNK = 64 * 1024


@dataclasses.dataclass
class Tally:
    sent: int = 0
    root_sent: int = 0
    # By the error's name; "ok" for a reply that is not an error.
    replies: Counter[str] = dataclasses.field(default_factory=Counter)
    # CALL messages after which luod closed the connection.
    closed: int = 0
    # Connections luod neither answered nor closed in REPLY_TIMEOUT.
    timeouts: int = 0
    fds_sent: int = 0
    fds_received: int = 0
    # What drew an InternalServerError (or no answer), for the report.
    examples: list[str] = dataclasses.field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.sent += other.sent
        self.root_sent += other.root_sent
        self.replies.update(other.replies)
        self.closed += other.closed
        self.timeouts += other.timeouts
        self.fds_sent += other.fds_sent
        self.fds_received += other.fds_received
        self.examples.extend(other.examples)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self) | {"replies": dict(self.replies)})

    @classmethod
    def from_json(cls, text: str) -> Tally:
        d = json.loads(text)
        d["replies"] = Counter(d["replies"])
        return cls(**d)


# --- fds of every kind ----------------------------------------------------------


@contextlib.contextmanager
def made_fd(kind: str) -> Iterator[int]:
    """An fd of `kind` (generator.FD_KINDS), closed afterwards with all it took."""
    extra: list[int] = []
    if kind == "memfd":
        fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
        os.write(fd, b"hostile")
    elif kind in ("pipe-read", "pipe-write"):
        r, w = os.pipe2(os.O_CLOEXEC)
        fd, other = (r, w) if kind == "pipe-read" else (w, r)
        extra.append(other)
    elif kind == "socket":
        a, b = socket.socketpair()
        fd = a.detach()
        extra.append(b.detach())
    elif kind == "regular-file":
        fd = os.open("/etc/passwd", os.O_RDONLY | os.O_CLOEXEC)
    elif kind == "eventfd":
        fd = os.eventfd(0, os.EFD_CLOEXEC)
    elif kind == "dev-null":
        fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    elif kind == "directory-opath":
        fd = os.open("/", os.O_PATH | os.O_CLOEXEC)
    elif kind == "file-opath":
        fd = os.open("/etc/passwd", os.O_PATH | os.O_CLOEXEC)
    elif kind == "directory":
        fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    elif kind == "epoll":
        ep = select.epoll()
        fd = os.dup(ep.fileno())
        ep.close()
    elif kind == "pidfd":
        fd = os.pidfd_open(os.getpid())
    elif kind == "memfd-opath":
        m = os.memfd_create("hostile", os.MFD_CLOEXEC)
        extra.append(m)
        fd = os.open(f"/proc/self/fd/{m}", os.O_PATH | os.O_CLOEXEC)
    else:
        raise ValueError(kind)
    try:
        yield fd
    finally:
        for f in (fd, *extra):
            os.close(f)


@contextlib.contextmanager
def made_fds(kinds: Sequence[str]) -> Iterator[list[int]]:
    """One fd per distinct kind, repeated as `kinds` names them (the kernel
    makes each copy a separate fd in luod)."""
    with contextlib.ExitStack() as stack:
        by_kind = {k: stack.enter_context(made_fd(k)) for k in dict.fromkeys(kinds)}
        yield [by_kind[k] for k in kinds]


# --- the wire --------------------------------------------------------------------


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.connect(path)
    s.settimeout(REPLY_TIMEOUT)
    return s


def _send(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    view = memoryview(data)
    if fds:
        n = socket.send_fds(sock, [view[:FIRST_CHUNK]], fds)
        view = view[n:]
    sock.sendall(view)


def _receive(sock: socket.socket, tally: Tally) -> bytes:
    """One read's bytes ("" at EOF); fds that came are counted and closed."""
    msg, ancdata, _flags, _addr = sock.recvmsg(1 << 16, socket.CMSG_SPACE(253 * 4))
    for level, typ, cdata in ancdata:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            n = len(cdata) // 4
            for i in range(n):
                os.close(int.from_bytes(cdata[4 * i : 4 * i + 4], "little", signed=True))
            tally.fds_received += n
    return msg


def _count_reply(raw: bytes, tally: Tally, m: Message) -> dict[str, Any]:
    try:
        reply = json.loads(raw)
        name = str(reply.get("error", "ok"))
    except (ValueError, AttributeError):
        reply, name = {}, "unparsable-reply"
    tally.replies[name] += 1
    if name == ISE and len(tally.examples) < 20:
        tally.examples.append(f"{m.category}: {m.what} (root={m.root})")
    return reply if isinstance(reply, dict) else {}


class Sender:
    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.buf = b""
        self.tally = Tally()

    def _drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buf = None, b""

    def send(self, m: Message) -> None:
        self.tally.sent += 1
        self.tally.fds_sent += len(m.fds)
        with made_fds(m.fds) as fds:
            if m.mode is Mode.ALONE:
                self._alone(m, fds)
            else:
                self._call(m, fds)

    def _call(self, m: Message, fds: list[int]) -> None:
        try:
            if self.sock is None:
                self.sock = _connect(self.path)
            _send(self.sock, m.data, fds)
            while b"\0" not in self.buf:
                got = _receive(self.sock, self.tally)
                if not got:
                    self.tally.closed += 1
                    self._drop()
                    return
                self.buf += got
        except TimeoutError:
            self._timeout(m)
            return
        except (BrokenPipeError, ConnectionResetError):
            self.tally.closed += 1
            self._drop()
            return
        raw, _, self.buf = self.buf.partition(b"\0")
        reply = _count_reply(raw, self.tally, m)
        if reply.get("continues"):
            # A stream was opened: leave it behind with its connection.
            self._drop()

    def _alone(self, m: Message, fds: list[int]) -> None:
        sock = _connect(self.path)
        buf = b""
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                _send(sock, m.data, fds)
                sock.shutdown(socket.SHUT_WR)
            while got := _receive(sock, self.tally):
                buf += got
        except TimeoutError:
            self._timeout(m)
        except ConnectionResetError:
            pass
        finally:
            sock.close()
        for raw in buf.split(b"\0")[:-1]:
            _count_reply(raw, self.tally, m)

    def _timeout(self, m: Message) -> None:
        self.tally.timeouts += 1
        if len(self.tally.examples) < 20:
            self.tally.examples.append(f"{m.category}: no answer to {m.what} (root={m.root})")
        self._drop()


def _send_as_child(path: str, messages: Sequence[Message], as_nobody: bool) -> str:
    sender = Sender(path)
    for m in messages:
        sender.send(m)
    sender._drop()
    if not as_nobody:
        sender.tally.root_sent = sender.tally.sent
    return sender.tally.to_json()


def send_batch(path: str, messages: Sequence[Message], as_nobody: bool) -> Tally:
    """Send `messages` from a forked child (uid 65534 when `as_nobody`)."""
    if not messages:
        return Tally()
    uid = NOBODY if as_nobody else os.getuid()
    return Tally.from_json(run_as(uid, lambda: _send_as_child(path, messages, as_nobody)))


def send_all(path: str, messages: Sequence[Message]) -> tuple[Tally, float]:
    """Root's messages, then nobody's; the tally and the time it took."""
    start = time.monotonic()
    tally = Tally()
    tally.add(send_batch(path, [m for m in messages if m.root], as_nobody=False))
    tally.add(send_batch(path, [m for m in messages if not m.root], as_nobody=True))
    return tally, time.monotonic() - start
