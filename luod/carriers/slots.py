"""The manifest memfd: two checksummed slots, written alternately.

Once preserved a memfd cannot grow or shrink, but writes into it are carried.
So the memfd has a fixed capacity and two slots; each write goes to the
slot not holding the newest copy, so a torn write can never destroy the last
good manifest. Slot layout (little endian):

    magic  8 bytes  b"LUODMAN\\0"
    format u32      SLOT_FORMAT
    seq    u64      increases with every write
    length u32      bytes of JSON
    sha256 32 bytes of the JSON
    json   `length` bytes: the base, a whole manifest

then, from the next multiple of 8, the log: changes made since the base,
each a record of its own (format 2; format 1 had no log):

    length u32      bytes of JSON, 0 ends the log
    seq    u64      the base's seq + 1, + 2, ...
    sha256 32 bytes of the JSON
    json   `length` bytes

A change is one appended record, so what a call writes is proportional to
what it changed, not to everything held (issue 12); a reader applies the
records in order and stops at the first that is not intact or not the next
in sequence (a torn append, or one left from an earlier use of the slot).
When the log outgrows its base or the slot, the next write is a new base
into the other slot.

Both carriers keep their manifest this way; they differ only in where a
memfd lives (a LUO session of luod's own, or luod's fd store). This module
is the one place that reads and writes slots, picks the newest manifest of
several memfds, and makes a larger memfd when the manifest outgrows one.
What the JSON says is luod.manifest's concern.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from collections.abc import Callable, Iterable, Sequence

from luod.manifest import ManifestError
from luod.record import record

SLOT_FORMAT = 2
READS_FORMATS = frozenset({1, SLOT_FORMAT})
SLOT_MAGIC = b"LUODMAN\0"
_HEADER = struct.Struct("<8sIQI32s")
_RECORD = struct.Struct("<IQ32s")
# The log may grow to the base's size (at least this) before a new base is
# written: reading a manifest then costs at most twice its size.
LOG_MIN = 64 * 1024


def _align(n: int) -> int:
    return (n + 7) & ~7


def slot_capacity(memfd_size: int) -> int:
    return memfd_size // 2 - _HEADER.size


def capacity_for(payload: int) -> int:
    """A memfd size with room for `payload` bytes per slot, and then some."""
    need = 2 * (payload + _HEADER.size)
    size = 64 * 1024
    while size < 2 * need:
        size *= 2
    return size


def write_slot(fd: int, memfd_size: int, slot: int, seq: int, payload: bytes) -> None:
    if len(payload) > slot_capacity(memfd_size):
        raise ValueError("manifest does not fit the slot")
    header = _HEADER.pack(
        SLOT_MAGIC, SLOT_FORMAT, seq, len(payload), hashlib.sha256(payload).digest()
    )
    # Body first, header last: a reader never sees a header for a body that
    # is not fully written.
    base = slot * (memfd_size // 2)
    os.pwrite(fd, payload, base + _HEADER.size)
    # An empty log: a record left from an earlier use of this slot would
    # be refused by its seq anyway, this spares reading it.
    end = _align(_HEADER.size + len(payload))
    if end + _RECORD.size <= memfd_size // 2:
        os.pwrite(fd, bytes(_RECORD.size), base + end)
    os.pwrite(fd, header, base)


def write_record(fd: int, memfd_size: int, slot: int, at: int, seq: int, payload: bytes) -> int:
    """Append `payload` as record `seq` at offset `at` of `slot`'s log; the
    offset after it. One write: a torn one fails its checksum."""
    end = at + _RECORD.size + len(payload)
    if _align(end) + _RECORD.size > memfd_size // 2:
        raise ValueError("the record does not fit the slot")
    record = _RECORD.pack(len(payload), seq, hashlib.sha256(payload).digest()) + payload
    # The next record's length field zeroed too, in the same write.
    os.pwrite(fd, record + bytes(_align(end) - end + 4), slot * (memfd_size // 2) + at)
    return _align(end)


@record
class SlotRead:
    """The newest manifest one slot holds: its base and the records after it."""

    seq: int  # of the newest change: the base's, or its last record's
    slot: int
    payload: bytes  # the base
    records: list[bytes] = dataclasses.field(default_factory=list)
    # Where the next record goes in the slot, and how big the base is.
    log_end: int = 0
    base_size: int = 0


def _read_log(fd: int, start: int, limit: int, seq: int) -> tuple[list[bytes], int, int]:
    """The intact records from `start` (absolute) up to `limit`, following
    base seq `seq`: (records, the last seq, the offset after the last)."""
    records: list[bytes] = []
    at = start
    while at + _RECORD.size <= limit:
        length, rseq, digest = _RECORD.unpack(os.pread(fd, _RECORD.size, at))
        if length == 0 or rseq != seq + 1 or at + _RECORD.size + length > limit:
            break
        payload = os.pread(fd, length, at + _RECORD.size)
        if hashlib.sha256(payload).digest() != digest:
            break
        records.append(payload)
        seq = rseq
        at = _align(at + _RECORD.size + length)
    return records, seq, at


def read_newest(fd: int) -> SlotRead:
    """The newest intact slot of a manifest memfd, or ManifestError."""
    size = os.fstat(fd).st_size
    if size < 2 * _HEADER.size:
        raise ManifestError(
            "corrupt", f"manifest memfd is {size} bytes, too small to hold a manifest"
        )
    best: SlotRead | None = None
    problems: list[str] = []
    for slot in (0, 1):
        base = slot * (size // 2)
        head = os.pread(fd, _HEADER.size, base)
        magic, fmt, seq, length, digest = _HEADER.unpack(head)
        if magic != SLOT_MAGIC:
            problems.append(f"slot {slot}: no manifest")
            continue
        if fmt not in READS_FORMATS:
            raise ManifestError(
                "version",
                f"manifest slot format {fmt} is not known to this luod "
                f"(it reads formats {', '.join(map(str, sorted(READS_FORMATS)))})",
            )
        if length > slot_capacity(size):
            problems.append(f"slot {slot}: length {length} exceeds the slot")
            continue
        payload = os.pread(fd, length, base + _HEADER.size)
        if hashlib.sha256(payload).digest() != digest:
            problems.append(f"slot {slot}: checksum mismatch")
            continue
        if best is None or seq > best.seq:
            start = base + _align(_HEADER.size + length)
            records, last, end = (
                _read_log(fd, start, base + size // 2, seq) if fmt >= 2 else ([], seq, start)
            )
            best = SlotRead(last, slot, payload, records, end - base, length)
    if best is None:
        raise ManifestError("corrupt", "manifest is corrupt: " + "; ".join(problems))
    return best


@record
class Found:
    """The newest manifest among several memfds, and which memfd holds it."""

    name: str
    fd: int
    read: SlotRead


def newest(
    candidates: Iterable[tuple[str, int | ManifestError]],
    unreadable: Callable[[str, ManifestError], None] | None = None,
) -> Found | None:
    """The newest manifest of the named memfds; None when there are none.

    A candidate is a memfd, or the ManifestError saying why a carrier found
    none where one should be. An unreadable memfd is passed over (and told
    to `unreadable`) as long as another one holds a manifest; when none
    does, the last error is raised, so that nothing is released on the
    strength of a manifest nobody could read."""
    best: Found | None = None
    broken: ManifestError | None = None
    for name, fd in candidates:
        if isinstance(fd, ManifestError):
            broken = fd
            continue
        try:
            read = read_newest(fd)
        except ManifestError as e:
            if unreadable is not None:
                unreadable(name, e)
            broken = e
            continue
        if best is None or read.seq > best.read.seq:
            best = Found(name, fd, read)
    if best is None and broken is not None:
        raise broken
    return best


@record
class SlotMemfd:
    """One manifest memfd luod writes to."""

    name: str
    fd: int
    size: int
    slot: int  # the slot written last; the next base goes to the other
    base_size: int = 0  # of the base in `slot`
    log_end: int = 0  # where the next record goes in `slot`

    def wrote_base(self, slot: int, payload: bytes) -> None:
        self.slot, self.base_size = slot, len(payload)
        self.log_end = _align(_HEADER.size + len(payload))

    @classmethod
    def create(cls, name: str, seq: int, payload: bytes) -> SlotMemfd:
        """A new memfd with room to grow, `payload` in slot 0."""
        size = capacity_for(len(payload))
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            write_slot(fd, size, 0, seq, payload)
        except BaseException:
            os.close(fd)
            raise
        out = cls(name, fd, size, 0)
        out.wrote_base(0, payload)
        return out


class SlotWriter:
    """luod's outgoing manifest: the memfd written to and the sequence
    number of its newest copy.

    save() writes into the slot not holding the newest copy while the
    manifest fits with room for its log; when it does not (or there is no
    memfd yet) it makes a new, larger memfd and hands it back, for the carrier to put where the
    next boot finds it before it calls replace() and drops the old one."""

    def __init__(self, names: Sequence[str]) -> None:
        """`names`: what a new memfd is called; a new one takes the first
        name the current one does not have, so with two names the old and
        the new memfd never share one."""
        self.names = names
        self.current: SlotMemfd | None = None
        self.seq = 0

    def follow(self, found: Found, write_in_it: bool) -> None:
        """Carry on after the incoming manifest `found`: the next write is
        newer. `write_in_it`: the incoming memfd becomes the one written to
        (where it is kept for the next boot already, as in an fd store);
        else the next save() makes a new memfd."""
        read = found.read
        self.seq = read.seq
        if write_in_it:
            fd = found.fd
            self.current = SlotMemfd(
                found.name, fd, os.fstat(fd).st_size, read.slot, read.base_size, read.log_end
            )

    def save(self, payload: bytes) -> SlotMemfd | None:
        """Write `payload` as the newest manifest. None when it went into the
        current memfd; else a new memfd holding it, not the current one yet."""
        self.seq += 1
        out = self.current
        # In place while the base leaves its log about as much room again;
        # else a larger memfd, so that the changes after it are appended
        # (capacity_for() doubles), not each written as a whole manifest.
        if out is not None and 2 * len(payload) <= slot_capacity(out.size):
            slot = 1 - out.slot
            write_slot(out.fd, out.size, slot, self.seq, payload)
            out.wrote_base(slot, payload)
            return None
        name = next((n for n in self.names if out is None or n != out.name), self.names[0])
        return SlotMemfd.create(name, self.seq, payload)

    def append(self, record: bytes) -> bool:
        """Append `record` (a change) to the newest manifest's log; False
        when it needs a new base instead (save()): no memfd written to yet,
        or the log would outgrow its base or the slot."""
        out = self.current
        if out is None:
            return False
        log = out.log_end - _align(_HEADER.size + out.base_size)
        if log + _RECORD.size + len(record) > max(out.base_size, LOG_MIN):
            return False
        try:
            out.log_end = write_record(
                out.fd, out.size, out.slot, out.log_end, self.seq + 1, record
            )
        except ValueError:
            return False
        self.seq += 1
        return True

    def replace(self, new: SlotMemfd) -> SlotMemfd | None:
        """`new` (from save()) is the memfd written to from now on; the old
        one is returned for the caller to drop."""
        old, self.current = self.current, new
        return old

    def close(self) -> None:
        if self.current is not None:
            os.close(self.current.fd)
            self.current = None
