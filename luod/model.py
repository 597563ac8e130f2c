"""What luod holds: sessions, the files in them, and their owners.

Records (luod.record); the fds luod holds live here too, so closing a session
in one place closes everything it keeps.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Mapping, Sequence
from typing import NoReturn

from luod.record import record

# A session's identity in luod: (owner uid, name). Names are scoped by owner:
# two uids may each hold a session called "cache", and nothing one of them
# calls ever reaches the other's.
SessionKey = tuple[int, str]


class SessionKind(enum.Enum):
    # luod created the kernel session and preserves memfds into it for a client.
    MANAGED = "managed"
    # A client created the session itself and handed its fd to luod.
    ADOPTED = "adopted"
    # luod created the session and handed it to the client, keeping its own
    # reference as custodian: the client preserves its own files into it.
    DELEGATED = "delegated"


class SessionState(enum.Enum):
    # In the kernel's outgoing list: carried over the next kexec.
    OUTGOING = "outgoing"
    # Came over the last kexec and was retrieved by luod; not claimed yet.
    INCOMING = "incoming"


@record(frozen=True)
class Owner:
    """Whose a session is: the uid, and the unit and command it came from."""

    uid: int
    unit: str | None = None
    comm: str = ""

    def describe(self) -> str:
        return f"{self.unit or self.comm or 'uid ' + str(self.uid)} (uid {self.uid})"


@record
class HeldFile:
    """A file luod holds in a session (a memfd), by its name there."""

    name: str
    token: int
    size: int
    preserved_at: float
    # luod's own reference to the file (a memfd): the kernel cannot hand a
    # file back out of an outgoing session, so a copy before the kexec, and
    # re-preserving after it, both need it. -1 when luod holds none.
    fd: int = -1
    # This file's entry in the manifest, serialised once by luod.manifest:
    # the fields above the fd never change, and serialising every held file
    # again on every hand-off call was most of a hand-off's cost.
    manifest_entry: str | None = dataclasses.field(default=None, repr=False, compare=False)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Tally:
    """How many files luod holds, and their bytes, in the sessions of one
    pool (root's, or every other uid's together), counted as they come and
    go (luod.ledger): the caps on what all uids hold together are checked
    on every hand-off, which must not cost more with what others hold."""

    __slots__ = ("bytes", "files")

    def __init__(self) -> None:
        self.files = 0
        self.bytes = 0


class HeldFiles(dict[str, HeldFile]):
    """A session's files by name, with their bytes counted as they come and
    go: a non-root uid's quota check counts what it holds on every hand-off,
    and summing every file's size cost about 210 us of host CPU at 4,000
    files, more than the rest of luod's work for the call. A file's size
    never changes once it is held. Their number and bytes are counted into
    `tally` while the session is in the ledger. Only the mutations luod uses are
    allowed; the others raise rather than miscount."""

    def __init__(self, files: Mapping[str, HeldFile] | None = None) -> None:
        super().__init__(files or ())
        self.size = sum(f.size for f in self.values())
        self.tally: Tally | None = None

    # dict's own methods are called unbound: cheaper than super().
    def __setitem__(self, name: str, f: HeldFile) -> None:
        old = dict.get(self, name)
        more = f.size if old is None else f.size - old.size
        self.size += more
        if self.tally is not None:
            if old is None:
                self.tally.files += 1
            self.tally.bytes += more
        dict.__setitem__(self, name, f)

    def __delitem__(self, name: str) -> None:
        size = dict.__getitem__(self, name).size
        self.size -= size
        dict.__delitem__(self, name)
        if self.tally is not None:
            self.tally.files -= 1
            self.tally.bytes -= size

    def add(self, files: Sequence[HeldFile]) -> None:
        """`files`, of names not held yet, at once: [name] = file costs a
        call into Python per file (3 K instructions; a hand-off's is 115 K)."""
        before, before_size = len(self), self.size
        expected, size, put = before + len(files), before_size, dict.__setitem__
        for f in files:
            put(self, f.name, f)
            size += f.size
        # A name held already was replaced: count again rather than guess.
        self.size = size if len(self) == expected else sum(f.size for f in self.values())
        if self.tally is not None:
            self.tally.files += len(self) - before
            self.tally.bytes += self.size - before_size

    def _not_counted(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("HeldFiles counts bytes through [name] = file, add() and del only")

    pop = popitem = clear = update = setdefault = __ior__ = _not_counted


@record
class Session:
    """A session luod holds: its kernel session and the files in it."""

    name: str
    kind: SessionKind
    owner: Owner
    kernel_name: str
    created_at: float
    state: SessionState = SessionState.OUTGOING
    fd: int = -1
    files: HeldFiles = dataclasses.field(default_factory=HeldFiles)
    # After a kexec: when the owner must have claimed it by, else released.
    claim_deadline: float | None = None
    kexec_count: int = 0
    # The highest token handed out in this session so far (0: not known
    # yet), so that a hand-off does not look at every file to find the next.
    token_high: int = dataclasses.field(default=0, repr=False, compare=False)

    def __post_init__(self) -> None:
        if type(self.files) is not HeldFiles:
            self.files = HeldFiles(self.files)

    @property
    def key(self) -> SessionKey:
        return (self.owner.uid, self.name)

    def next_token(self) -> int:
        if not self.token_high and self.files:
            self.token_high = max(f.token for f in self.files.values())
        self.token_high += 1
        return self.token_high

    @property
    def bytes_pinned(self) -> int:
        return self.files.size

    def close(self) -> None:
        """Drop every fd luod holds for this session. For an outgoing
        session this unpreserves everything in it (the kernel's rule)."""
        for f in self.files.values():
            f.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@record(frozen=True)
class Holdings:
    """How much luod holds, in all or for one uid: what its status reports
    and what the quotas count."""

    sessions: int
    files: int
    bytes_pinned: int
