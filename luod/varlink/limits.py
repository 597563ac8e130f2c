"""What one varlink client may take of luod: connections, message sizes, time.

luod's socket is open to every local user. Each connection costs luod an fd
and some memory, each message CPU to parse; the fds luod holds in custody
come from the same open-file limit. So every connection and message is
bounded here, and luod.varlink.transport enforces it:

- connections: a global cap well below the open-file limit, of which a
  reserve only root may use, and a cap per uid (sd-varlink has the same
  two); a connection over a cap is closed at once;
- messages: at most MAX_MESSAGE bytes (sd-varlink's limit), nested at most
  MAX_DEPTH deep, valid UTF-8 JSON objects that are varlink calls
  (luod.varlink.transport checks that); anything else is a protocol
  violation, which closes the connection and every fd that came with it;
- time and memory: a connection that sent no message within the idle
  timeout of connecting is closed (one that did is bounded by the caps: a
  service may keep a connection open to call on it later), and so is one
  that does not finish a message it began within the idle timeout (its
  fds are closed with it); one that does not read its replies is closed
  once MAX_QUEUED_REPLY bytes or MAX_QUEUED_REPLY_FDS fds of them wait;
- fds in transit (TransitFds): those of messages not yet whole and of
  replies not yet sent, each an fd of luod's in no custody, have a global
  cap below the open-file limit, of which a reserve only root may use, and
  a cap per uid; a connection that would take its uid over one is closed,
  and the fds with it;
- bytes in transit (TransitBytes): those of messages not yet whole, which
  luod keeps until the rest comes, and of replies not yet sent have the
  same three caps (one uid's 128 connections each with a message of 16 MiB
  begun took luod's memory to 2 GiB);
- the log: what a client can cause at will is logged at a bounded rate.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

from luod.record import record
from luod.scmrights import SCM_MAX_FD

# sd-varlink's VARLINK_BUFFER_MAX.
MAX_MESSAGE = 16 * 1024 * 1024
# luod's deepest call (PreserveFds) nests 4 deep; sd-json allows far more,
# but Python's parser recurses, and a RecursionError is no answer.
MAX_DEPTH = 64
# Replies waiting for a client that does not read; one reply of any size is
# always queued, so a large ListSessions still goes out.
MAX_QUEUED_REPLY = 1024 * 1024
# No single sendmsg carries more; a message spread over several chunks may
# not carry more in all either.
MAX_FDS_PER_MESSAGE = SCM_MAX_FD
# fds in replies waiting for a client that does not read: what one reply
# carries at most. Each is an fd of luod's (RetrieveFd's copy of a held
# file) until it is sent: bounded by bytes alone, a connection of small
# replies would hold 9,000 of them, and one uid's connections more than
# luod's LimitNOFILE.
MAX_QUEUED_REPLY_FDS = MAX_FDS_PER_MESSAGE
# Calls read but not yet served, per connection: reading pauses there, so a
# client pipelining calls fills its own socket buffer, not luod's memory.
MAX_PENDING_CALLS = 64

DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_MAX_CONNECTIONS_PER_USER = 128
DEFAULT_IDLE_TIMEOUT = 30.0

# fds in transit (TransitFds). Bounded per connection only (253 of a
# message begun, 253 of replies waiting), one uid's 128 connections held
# 32,384 and many uids' more than luod's open-file limit: root's own
# hand-off then failed with TooManyOpenFiles. Per uid: four whole messages
# and some (a client handing off over four connections at once, or two
# connections each with a message begun and a full reply queue), a quarter
# of a uid's quota of held files (4096).
DEFAULT_MAX_TRANSIT_FDS_PER_USER = 1024
# In all: a quarter of luod.service's LimitNOFILE (262144), see
# default_max_transit_fds.
DEFAULT_MAX_TRANSIT_FDS = 262144 // 4

# Bytes in transit (TransitBytes): of messages begun, of replies not sent.
# Bounded per connection only (MAX_MESSAGE, MAX_QUEUED_REPLY), one uid's
# 128 connections held 2 GiB of luod's memory and every uid's 4,096
# connections 64 GiB. A message a client sends in one go is read whole and
# never counted, a reply the socket takes at once neither: what counts is
# a message sent in pieces or left unfinished, and replies a client does
# not read. Per uid two of the largest messages; in all 512 MiB, of which
# 64 MiB (four of the largest messages) only root may use.
DEFAULT_MAX_TRANSIT_BYTES_PER_USER = 2 * MAX_MESSAGE
DEFAULT_MAX_TRANSIT_BYTES = 32 * MAX_MESSAGE
DEFAULT_TRANSIT_BYTES_RESERVED_FOR_ROOT = 4 * MAX_MESSAGE


def default_max_connections(nofile: int) -> int:
    """A quarter of the open-file limit, at most 4096: the rest is for the
    files luod holds (LimitNOFILE=262144 in luod.service)."""
    return max(8, min(DEFAULT_MAX_CONNECTIONS, nofile // 4))


def default_max_transit_fds(nofile: int) -> int:
    """A quarter of the open-file limit: the connections take at most
    another quarter, and the half left is for the files luod holds (as
    luod.service's fd store is half its LimitNOFILE). At least two whole
    messages: root's and one of everyone else's."""
    return max(2 * MAX_FDS_PER_MESSAGE, nofile // 4)


def default_transit_fds_reserved_for_root(total: int) -> int:
    """Of `total` fds in transit, how many only root may use: an eighth, as
    of the connections, and at least one whole message, so that root hands
    off while everyone else is at the cap."""
    return max(MAX_FDS_PER_MESSAGE, total // 8)


@record(frozen=True)
class Limits:
    """How many connections luod serves (in all, kept for root, per user), how
    long a new one may stay silent, and how many fds and bytes it holds for
    them in transit (in all, kept for root, per user)."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # Of max_connections, how many only root may use.
    reserved_for_root: int = DEFAULT_MAX_CONNECTIONS // 8
    max_per_user: int = DEFAULT_MAX_CONNECTIONS_PER_USER
    # Seconds a new connection may stay silent; 0: for ever.
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_transit_fds: int = DEFAULT_MAX_TRANSIT_FDS
    # Of max_transit_fds, how many only root may use.
    transit_fds_reserved_for_root: int = default_transit_fds_reserved_for_root(
        DEFAULT_MAX_TRANSIT_FDS
    )
    max_transit_fds_per_user: int = DEFAULT_MAX_TRANSIT_FDS_PER_USER
    max_transit_bytes: int = DEFAULT_MAX_TRANSIT_BYTES
    # Of max_transit_bytes, how many only root may use.
    transit_bytes_reserved_for_root: int = DEFAULT_TRANSIT_BYTES_RESERVED_FOR_ROOT
    max_transit_bytes_per_user: int = DEFAULT_MAX_TRANSIT_BYTES_PER_USER


class _Shares:
    """A count in all and per uid against three caps: one in all, the last
    `reserved` of which only root may use, and one per uid but root. What
    would go over a cap is not counted; the cap is said by its option."""

    def __init__(
        self, option: str, cap: int, reserved: int, per_user_option: str, per_user: int
    ) -> None:
        self._option, self._cap, self._reserved = option, cap, reserved
        self._per_user_option, self._per_user = per_user_option, per_user
        self.total = 0
        self.by_uid: collections.Counter[int] = collections.Counter()

    def take(self, uid: int, count: int = 1) -> str | None:
        """Count `count` more of `uid`'s in, or say which cap they would go
        over (and count nothing)."""
        total = self.total + count
        if uid == 0:
            if total > self._cap:
                return f"{self._option}={self._cap}"
        else:
            if total > self._cap - self._reserved:
                return f"{self._option}={self._cap} (of which {self._reserved} reserved for root)"
            if self.by_uid[uid] + count > self._per_user:
                return f"{self._per_user_option}={self._per_user}"
        self.total = total
        self.by_uid[uid] += count
        return None

    def give_back(self, uid: int, count: int = 1) -> None:
        self.total -= count
        self.by_uid[uid] -= count
        if self.by_uid[uid] <= 0:
            del self.by_uid[uid]


class ConnectionCounts(_Shares):
    """Connections open, in all and per uid, against the caps of `limits`."""

    def __init__(self, limits: Limits) -> None:
        super().__init__(
            "max-connections",
            limits.max_connections,
            limits.reserved_for_root,
            "max-connections-per-user",
            limits.max_per_user,
        )

    def admit(self, uid: int) -> str | None:
        """Count a new connection of `uid` in, or say which cap it is over."""
        return self.take(uid)

    def release(self, uid: int) -> None:
        self.give_back(uid)


class TransitFds(_Shares):
    """fds luod holds for its connections that are in no custody: those of
    a message not yet whole (luod.varlink.transport counts them from the
    chunk that brings them until the message is served or dropped) and
    those of replies not yet sent (from when one is queued until it is
    sent or dropped). In all and per uid, against the caps of `limits`;
    what one connection holds of them is bounded by the caps of a message
    and of its reply queue, what they all hold only here."""

    def __init__(self, limits: Limits) -> None:
        super().__init__(
            "max-transit-fds",
            limits.max_transit_fds,
            limits.transit_fds_reserved_for_root,
            "max-transit-fds-per-user",
            limits.max_transit_fds_per_user,
        )


class TransitBytes(_Shares):
    """Bytes luod keeps for its connections: of messages not yet whole
    (luod.varlink.transport counts each chunk of one until the message is
    served or dropped) and of replies not yet sent (from when one is queued
    until it is sent or dropped). In all and per uid, against the caps of
    `limits`; what one connection keeps is bounded by MAX_MESSAGE and
    MAX_QUEUED_REPLY, what they all keep only here."""

    def __init__(self, limits: Limits) -> None:
        super().__init__(
            "max-transit-bytes",
            limits.max_transit_bytes,
            limits.transit_bytes_reserved_for_root,
            "max-transit-bytes-per-user",
            limits.max_transit_bytes_per_user,
        )


class Transit:
    """What luod holds for every connection together that is in no
    custody: fds (TransitFds) and bytes (TransitBytes) of messages begun
    and of replies not sent."""

    __slots__ = ("bytes", "fds")

    def __init__(self, limits: Limits) -> None:
        self.fds = TransitFds(limits)
        self.bytes = TransitBytes(limits)


class RateLimit:
    """At most `burst` events per `interval` seconds; what is held back is
    counted and reported with the next event let through."""

    def __init__(self, burst: int = 10, interval: float = 10.0) -> None:
        self.burst = burst
        self.interval = interval
        self.window_start = -interval
        self.in_window = 0
        self.suppressed = 0

    def allow(self, now: float | None = None) -> int | None:
        """None: hold this event back. Else how many were held back before it."""
        now = time.monotonic() if now is None else now
        if now - self.window_start >= self.interval:
            self.window_start = now
            self.in_window = 0
        if self.in_window >= self.burst:
            self.suppressed += 1
            return None
        self.in_window += 1
        held, self.suppressed = self.suppressed, 0
        return held

    def log(self, method: Callable[..., Any], event: str, **fields: Any) -> None:
        """Log `event` with `method` (log.warning...) unless held back; with
        how many were held back before it, if any."""
        held = self.allow()
        if held is None:
            return
        if held:
            fields["suppressed"] = held
        method(event, **fields)


# What a client can cause at will is logged at a bounded rate.
violations = RateLimit()
idle_closed = RateLimit()
not_reading = RateLimit()
refused = RateLimit()
accept_failed = RateLimit(burst=1)

# When accept() fails (EMFILE...): the listen backlog holds the connection
# until luod has an fd for it again; trying again at once is a busy loop.
ACCEPT_BACKOFF_FIRST = 0.01
ACCEPT_BACKOFF_MAX = 1.0


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# --- messages ----------------------------------------------------------------


class ProtocolViolation(Exception):
    """A message that is no varlink message: the connection is closed."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_decoder = json.JSONDecoder(parse_constant=_no_constant)


class MessageBuffer:
    """The message being read, chunk by chunk as the socket gives it, with
    the fds that came with any of its chunks. Grows linearly (asyncvarlink
    joined the whole buffer again per chunk, quadratic), up to MAX_MESSAGE
    bytes and MAX_FDS_PER_MESSAGE fds."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.data = bytearray()
        self.fds: list[int] = []
        self.dropped = False  # the kernel dropped fds of it (MSG_CTRUNC)
        self.size = 0

    @property
    def nfds(self) -> int:
        return len(self.fds)

    def add(self, chunk: memoryview, fds: list[int], dropped: bool) -> bool:
        """Take a chunk (ending in the NUL, or holding none): True once the
        message is whole. ProtocolViolation when it is too large: drop()."""
        self.fds += fds
        self.dropped |= dropped
        whole = len(chunk) > 0 and chunk[-1] == 0
        self.size += len(chunk) - whole
        if self.size > MAX_MESSAGE:
            raise ProtocolViolation(f"longer than {MAX_MESSAGE} bytes without a NUL")
        if len(self.fds) > MAX_FDS_PER_MESSAGE:
            raise ProtocolViolation(f"more than {MAX_FDS_PER_MESSAGE} fds")
        self.data += chunk[: len(chunk) - whole]
        return whole

    def take(self) -> tuple[bytes, list[int], bool]:
        """The whole message (without its NUL), its fds, whether some were dropped."""
        message = (bytes(self.data), self.fds, self.dropped)
        self._reset()
        return message

    def drop(self) -> None:
        """Forget an unfinished message and close its fds."""
        close_fds(self.fds)
        self._reset()


def decode_message(data: bytes) -> dict[str, Any]:
    """One message (without its NUL) as a JSON object, or ProtocolViolation."""
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise ProtocolViolation(f"not UTF-8 (byte {e.start})") from None
    try:
        obj = _decoder.decode(text)
    except RecursionError:
        raise ProtocolViolation(f"nested more than {MAX_DEPTH} deep") from None
    except ValueError as e:
        raise ProtocolViolation(f"not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ProtocolViolation(f"a JSON {type(obj).__name__}, not an object")
    # Counting brackets is cheap and bounds the depth from above (brackets
    # inside strings count too): only then is the depth measured, in the text.
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH and text_depth(data) > MAX_DEPTH:
        raise ProtocolViolation(f"nested more than {MAX_DEPTH} deep")
    return obj


# An escape (backslash and the character after it: only inside strings);
# then, of the text, only quotes and brackets, each bracket as a
# parenthesis (valid JSON closes what it opens, so which kind does not
# matter); strings are then quotes around parentheses only.
_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_PARENS = bytes.maketrans(b"[]{}", b"()()")
_STRING = re.compile(rb'"[^"]*"')


def text_depth(data: bytes, limit: int = MAX_DEPTH) -> int:
    """How deep arrays and objects nest in the JSON text `data` (valid
    JSON: it was parsed), read from the text: its brackets outside strings,
    innermost pairs taken away until none is left; more than `limit`
    passes stop at limit + 1. A
    PreserveFds of 250 files has 250 objects in a list: walking the parsed
    object cost twice what parsing it did (and as much as the rest of
    luod's work per fd)."""
    if b"\\" in data:
        data = _ESCAPE.sub(b"", data)
    structure = data.translate(_PARENS, _NOT_STRUCTURE)
    # Strings are mostly without brackets: taking away the empty ones
    # leaves no quote then. (The first string with a bracket in it would
    # leave its opening quote: then each string is taken away.)
    brackets = structure.replace(b'""', b"")
    if b'"' in brackets:
        brackets = _STRING.sub(b"", structure)
    passes = 0
    while brackets:
        if passes > limit:
            break
        # bytes.replace() does not look again at what a removal joins: one
        # level per pass.
        brackets = brackets.replace(b"()", b"")
        passes += 1
    return passes
