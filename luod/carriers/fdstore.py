"""The fd-store carrier: luod's session fds and its manifest in luod's own fd store.

Under systemd >= 261 with FileDescriptorStorePreserve=yes, PID 1 carries a
service's fd store over a kexec: at shutdown it preserves every memfd of the
store into its own LUO session 'systemd' and records every LUO session fd of
the store by its session name (sessions cannot be nested); after the kexec it
retrieves both and puts them back into the store under the same FDNAME. The
service gets its store in LISTEN_FDS/LISTEN_FDNAMES when it starts, after a
kexec as after a plain restart.

So luod pushes every session fd it holds (FDSTORE=1, FDNAME=session.NAME)
and its manifest memfd (FDNAME=luod-manifest-a or -b) into the store, and
takes them back from LISTEN_FDS at start. What that gives:

- luod may crash or be restarted: the store keeps every session open, so
  nothing is unpreserved; the new luod holds the same OUTGOING sessions
  again. It has no reference to the memfds inside them any more (the kernel
  cannot hand a file back out of an outgoing session) until the next kexec.
- luod is stopped before the kexec like any service and releases
  /dev/liveupdate on the way out; PID 1 does the rest. After the kexec the
  session fds in LISTEN_FDS are INCOMING sessions already retrieved by PID 1:
  `retrieve_session()` hands those out instead of asking the kernel, which
  would answer EINVAL (a session can be retrieved once).

luod also keeps its own references to the files of each session where a
crash cannot drop them: parked in a socket pair whose two ends are in the
store (FDNAME=refs.<kernel session name>, luod.carriers.parking). The
kernel cannot hand a file back out of an outgoing session, so without them
a restarted luod could not give out a copy, take a file or undo a half-done
hand-off until the next kexec.

A small journal memfd (FDNAME=luod-journal) records the change luod is
about to make, before its first kernel step (`intend`): a luod restarted
after a crash in the middle of it finds the intent next to a manifest of
the same sequence number, and rebuilds what the change touched
(luod.reclaim).

The manifest keeps the two-slot format of luod.carriers.slots. A memfd in the
store is not preserved before shutdown, so it could grow; but a new, larger
memfd under the other name is pushed before the old one is removed, so the
store always holds one complete manifest, also when luod dies in between
(load() then takes the newer of the two).
"""

from __future__ import annotations

import errno
import os
import stat
import urllib.parse
from collections.abc import Callable, Sequence

from luod import notify, servicemanager
from luod.carriers import (
    CarrierOptions,
    CarrierProblem,
    IncomingState,
    store_max_from_env,
)
from luod.carriers.parking import Parking
from luod.carriers.slots import SlotWriter, newest, read_newest, slot_capacity, write_slot
from luod.crashpoint import reached
from luod.kernel import fdinfo
from luod.kernel.backend import Backend, LuoError
from luod.log import get_logger
from luod.manifest import ManifestError
from luod.notify import ListenFd

log = get_logger()

MANIFEST_NAMES = ("luod-manifest-a", "luod-manifest-b")
SESSION_FDNAME_PREFIX = "session."
PARKING_FDNAME_PREFIX = "refs."
JOURNAL_NAME = "luod-journal"
# An intent names one session or two; the journal never grows.
JOURNAL_SIZE = 16 * 1024

# notify.notify's signature: send a message with fds, True when it went out.
Send = Callable[[str, Sequence[int]], bool]


def fdname_for(kernel_name: str) -> str:
    """The FDNAME a session fd is stored under.

    A valid fd name is printable ASCII without ':' (the separator of
    LISTEN_FDNAMES) and at most 255 characters. Session names may contain
    ':', so it and everything else outside printable ASCII is percent-encoded
    ('%' too, so that two session names never share an fd name). 63 bytes
    of name give at most 8 + 3 * 63 = 197 characters."""
    return SESSION_FDNAME_PREFIX + _encode(kernel_name)


def parking_fdname(kernel_name: str) -> str:
    """The FDNAME both ends of a session's parking are stored under."""
    return PARKING_FDNAME_PREFIX + _encode(kernel_name)


def kernel_name_of_parking(fdname: str) -> str | None:
    """The inverse of parking_fdname(), None for any other name."""
    if not fdname.startswith(PARKING_FDNAME_PREFIX):
        return None
    try:
        name = urllib.parse.unquote(fdname[len(PARKING_FDNAME_PREFIX) :], errors="strict")
    except UnicodeDecodeError:
        return None
    return name or None


def _encode(text: str) -> str:
    out: list[str] = []
    for b in text.encode():
        if 0x20 < b < 0x7F and b not in b":%":
            out.append(chr(b))
        else:
            out.append(f"%{b:02X}")
    return "".join(out)


def open_carrier(
    backend: Backend, listen: Sequence[ListenFd], options: CarrierOptions
) -> FdStoreCarrier:
    """The carrier, owning `listen`; SystemExit without a service manager."""
    if not options.environ.get("NOTIFY_SOCKET"):
        raise SystemExit(
            "luod: --carrier=fdstore needs a service manager with an fd store "
            "($NOTIFY_SOCKET and FileDescriptorStoreMax=); there is none"
        )
    problem, version = servicemanager.fdstore_kexec_problem(options.service_manager)
    if problem is None:
        log.info("service-manager-carries-fdstore", version=version)
    else:
        # Within this boot the store still keeps everything across a
        # restart of luod; a kexec is what the preflight check refuses.
        log.warning("service-manager-drops-fdstore", version=version, reason=problem)
    return FdStoreCarrier(
        backend,
        listen,
        store_max_from_env(options.environ.get("FDSTORE")),
        kexec_problem=problem,
    )


class FdStoreCarrier:
    """The Carrier for luod under systemd >= 261 (FileDescriptorStorePreserve=yes)."""

    name = "fdstore"
    # The store keeps every session open when luod exits without a kexec.
    holds_after_exit = True

    def __init__(
        self,
        backend: Backend,
        listen: Sequence[ListenFd],
        store_max: int | None = None,
        send: Send = notify.notify,
        kexec_problem: str | None = None,
    ) -> None:
        """`listen`: the LISTEN_FDS entries other than the varlink socket;
        every one of them is now owned by the carrier. `kexec_problem`: why
        the service manager would not carry the store over a kexec
        (luod.servicemanager), None when it does."""
        self.backend = backend
        self.store_max = store_max
        self.kexec_problem = kexec_problem
        self._send = send
        # kernel session name -> FDNAME, for every session fd in the store.
        self._stored: dict[str, str] = {}
        # Session fds from LISTEN_FDS the core has not taken (retrieve_session).
        self._incoming: dict[str, int] = {}
        self._manifests: list[tuple[str, int]] = []  # manifest memfds from LISTEN_FDS
        self._junk: set[str] = set()  # FDNAMEs of store entries closed as unknown
        self._manifest = SlotWriter(MANIFEST_NAMES)
        self._pushed = False  # whether the store has the manifest memfd written to
        self._failed: dict[str, str] = {}  # kernel name -> why its push failed
        # Kernel session name -> the parking of luod's references to its
        # files (in the store), and the ends of those the previous luod
        # left that nobody claimed yet (kept_files()).
        self._parked: dict[str, Parking] = {}
        self._parked_in: dict[str, list[int]] = {}
        self._unkept: dict[
            str, int
        ] = {}  # kernel name -> files not kept: no copies after a restart
        # The journal memfd: fd, the slot written last, its own sequence.
        self._journal = -1
        self._journal_slot = 1
        self._journal_seq = 0
        self._journal_pushed = False
        for entry in listen:
            self._sort(entry)

    # --- LISTEN_FDS -----------------------------------------------------------

    def _sort(self, entry: ListenFd) -> None:
        """Keep a manifest memfd, the journal, a kept file or a LUO session;
        close anything else."""
        parked = kernel_name_of_parking(entry.name)
        if parked is not None:
            if not stat.S_ISSOCK(os.fstat(entry.fd).st_mode):
                facts = fdinfo.inspect_fd(entry.fd)
                self._discard(entry, f"named like a parking of luod's but {facts.describe()}")
            else:
                self._parked_in.setdefault(parked, []).append(entry.fd)
            return
        if entry.name == JOURNAL_NAME:
            facts = fdinfo.inspect_fd(entry.fd)
            if facts.kind is not fdinfo.FdKind.MEMFD:
                self._discard(entry, f"named like luod's journal but {facts.describe()}")
                return
            if self._journal >= 0:
                os.close(self._journal)  # a repeated push: one is as good
            self._journal = entry.fd
            self._journal_pushed = True
            return
        if entry.name in MANIFEST_NAMES:
            facts = fdinfo.inspect_fd(entry.fd)
            if facts.kind is fdinfo.FdKind.MEMFD:
                self._manifests.append((entry.name, entry.fd))
                return
            self._discard(entry, f"named like a manifest but {facts.describe()}")
            return
        kernel_name = self.backend.identify_session(entry.fd)
        if kernel_name is None:
            facts = fdinfo.inspect_fd(entry.fd)
            self._discard(entry, f"neither a manifest nor a LUO session: {facts.describe()}")
            return
        if kernel_name in self._incoming:
            # The store never holds one session twice unless a push was
            # repeated; the copy kept is as good as this one.
            os.close(entry.fd)
            log.warning(
                "fdstore-duplicate-closed",
                kernel_name=kernel_name,
                name=entry.name,
                kept=self._stored[kernel_name],
            )
            if entry.name != self._stored[kernel_name]:
                self._junk.add(entry.name)
            return
        if entry.name != fdname_for(kernel_name):
            # The kernel's name is authoritative; the label only has to be
            # known to remove the entry later.
            log.warning(
                "fdstore-unexpected-name",
                kernel_name=kernel_name,
                name=entry.name,
                expected=fdname_for(kernel_name),
            )
        self._incoming[kernel_name] = entry.fd
        self._stored[kernel_name] = entry.name

    def _discard(self, entry: ListenFd, why: str) -> None:
        os.close(entry.fd)
        self._junk.add(entry.name)
        log.warning("fdstore-fd-closed", name=entry.name, reason=why)

    # --- Carrier --------------------------------------------------------------

    def describe(self, counts: bool = True) -> str:
        if not counts:
            text = "fd store"
            if self.kexec_problem is not None:
                text += "; NOT carried over a kexec by the service manager"
            return text
        out = self._manifest.current
        manifest = "no manifest yet" if out is None else f"manifest '{out.name}' ({out.size} bytes)"
        limit = f" of at most {self.store_max}" if self.store_max is not None else ""
        text = f"fd store: {manifest}, {len(self._stored)} session fds{limit}"
        if self._parked:
            text += f", file references of {len(self._parked)} sessions"
        if self._unkept:
            text += (
                f" ({sum(self._unkept.values())} files not kept: "
                "no copies of them after a restart until the next kexec)"
            )
        if self.kexec_problem is not None:
            text += "; NOT carried over a kexec by the service manager"
        not_stored = self._not_stored()
        if not_stored:
            text += f"; {len(not_stored)} not in the store"
        return text

    def load(self) -> IncomingState | None:
        found = newest(self._manifests, unreadable=_log_unreadable)
        if found is None:
            if self._incoming:
                raise ManifestError(
                    "corrupt",
                    f"luod's fd store holds {len(self._incoming)} LUO sessions but no manifest "
                    f"({', '.join(sorted(self._incoming))}): nobody knows what they hold",
                )
            return None
        # The incoming manifest memfd is in the store already: write on in it.
        self._manifest.follow(found, write_in_it=True)
        self._pushed = True
        return IncomingState(
            found.read.payload,
            f"fd store entry '{found.name}'",
            self._intent(found.read.seq),
            found.read.records,
        )

    def _intent(self, manifest_seq: int) -> bytes | None:
        """The journal's intent if it was recorded after the manifest of
        sequence `manifest_seq`, i.e. not committed since."""
        if self._journal < 0:
            return None
        try:
            read = read_newest(self._journal)
        except ManifestError as e:
            log.warning("fdstore-journal-unreadable", reason=e.message)
            return None
        self._journal_slot, self._journal_seq = read.slot, read.seq
        seq, _, payload = read.payload.partition(b"\n")
        return payload if seq == str(manifest_seq).encode() else None

    def retrieve_session(self, kernel_name: str) -> int:
        fd = self._incoming.pop(kernel_name, None)
        if fd is None:
            raise LuoError("retrieve_session", errno.ENOENT, f"{kernel_name} (not in the fd store)")
        return fd

    def release_unclaimed(self) -> None:
        """Session fds and kept files nobody claimed: their store entries
        go too, so that the kernel drops them."""
        for kernel_name, fd in self._incoming.items():
            os.close(fd)
            fdname = self._stored.pop(kernel_name)
            self._remove(fdname)
            log.warning(
                "fdstore-session-released",
                kernel_name=kernel_name,
                name=fdname,
                reason="not in the manifest",
            )
        self._incoming.clear()
        for kernel_name, fds in self._parked_in.items():
            Parking.of_fds(fds).close()
            fdname = parking_fdname(kernel_name)
            self._remove(fdname)
            log.warning(
                "fdstore-references-released",
                kernel_name=kernel_name,
                name=fdname,
                reason="not in the manifest",
            )
        self._parked_in.clear()

    def finish_incoming(self) -> None:
        """Release what the manifest does not name: session fds and kept
        files nobody claimed, an older manifest, and entries closed as
        unknown."""
        self.release_unclaimed()
        out = self._manifest.current
        for name, fd in self._manifests:
            if out is not None and fd == out.fd:
                continue
            os.close(fd)
            self._remove_unless_used(name)
            log.info("fdstore-manifest-dropped", name=name, reason="an older manifest")
        self._manifests.clear()
        for name in sorted(self._junk):
            self._remove_unless_used(name)
        self._junk.clear()

    def save(self, payload: bytes) -> None:
        new = self._manifest.save(payload)
        if new is None:
            out = self._manifest.current
            assert out is not None
            if not self._pushed:
                self._pushed = self._push(out.name, out.fd, what="manifest")
            return
        # A new, larger memfd under the other name, pushed before the old
        # one is removed.
        pushed = self._push(new.name, new.fd, what="manifest")
        old, old_pushed = self._manifest.replace(new), self._pushed
        self._pushed = pushed
        log.info("fdstore-manifest-created", name=new.name, size=new.size, pushed=pushed)
        if old is not None:
            # Even if the new one did not reach the store: an old manifest
            # would name fewer sessions than the store holds, and the next
            # luod would release the rest. No manifest releases nothing.
            if old_pushed:
                self._remove(old.name)
            os.close(old.fd)

    def append(self, record: bytes) -> bool:
        # Only into a manifest the store has: else save() pushes it again.
        return self._pushed and self._manifest.append(record)

    def session_held(self, kernel_name: str, fd: int) -> None:
        if kernel_name in self._stored:
            return  # it came from the store
        fdname = fdname_for(kernel_name)
        if self._push(fdname, fd, what="session", kernel_name=kernel_name):
            self._stored[kernel_name] = fdname
            self._failed.pop(kernel_name, None)
        else:
            self._failed[kernel_name] = (
                "its session fd is not in luod's fd store: it is lost when luod stops"
            )

    def session_dropped(self, kernel_name: str) -> None:
        self._failed.pop(kernel_name, None)
        fdname = self._stored.pop(kernel_name, None)
        if fdname is not None:
            self._remove(fdname)

    def settle(self, timeout: float) -> None:
        # PID 1 closes its copy of a session fd when it reads FDSTOREREMOVE:
        # once it answered a barrier sent after that, it has.
        if not notify.barrier(timeout, via=self._send):
            log.warning("fdstore-barrier-timeout", timeout=timeout)

    def keep_files(self, kernel_name: str, refs: Sequence[tuple[int, int]]) -> None:
        if not refs:
            return
        parking = self._parked.get(kernel_name)
        if parking is None:
            parking = Parking.create()
            # Both ends in one message: one entry each, under one name.
            if not self._push(
                parking_fdname(kernel_name), parking.filenos(), what="references", entries=2
            ):
                parking.close()
                self._unkept[kernel_name] = self._unkept.get(kernel_name, 0) + len(refs)
                return
            self._parked[kernel_name] = parking
        # A message per hand-off fills the socket buffer after some
        # hundreds: then everything is parked again in full messages.
        if not parking.park(refs) and not parking.compact(refs):
            self._unkept[kernel_name] = self._unkept.get(kernel_name, 0) + len(refs)
            log.error(
                "fdstore-references-full",
                kernel_name=kernel_name,
                files=len(refs),
                reason="the parking's socket buffer is full",
            )

    def release_files(self, kernel_name: str) -> None:
        self._unkept.pop(kernel_name, None)
        parking = self._parked.pop(kernel_name, None)
        if parking is not None:
            parking.close()
            self._remove(parking_fdname(kernel_name))

    def kept_files(self, kernel_name: str) -> dict[int, int]:
        fds = self._parked_in.pop(kernel_name, None)
        if fds is None:
            return {}
        parking = Parking.of_fds(fds)
        # Copied, not received: after a crash in a change they may be all
        # that holds the session's files, and they must outlive this luod
        # at every step.
        refs = parking.copy_all() if len(parking.ends) == 2 else None
        if refs is not None:
            reached("reclaim.refs")
            self._parked[kernel_name] = parking
            return refs
        # One end only (the store lost the other), or a kernel that cannot
        # peek: received and parked again, in a new parking for one end.
        if len(parking.ends) == 2:
            log.warning(
                "fdstore-references-not-peeked",
                kernel_name=kernel_name,
                reason="the kernel cannot peek at a parking's messages (SO_PEEK_OFF)",
                hint="received and parked again: a luod killed meanwhile loses them",
            )
        refs = parking.take_all()
        reached("reclaim.refs")
        if parking.park(sorted(refs.items())):
            self._parked[kernel_name] = parking
        else:
            parking.close()
            self._remove(parking_fdname(kernel_name))
            self.keep_files(kernel_name, sorted(refs.items()))
        return refs

    def intend(self, payload: bytes) -> None:
        if self._journal < 0:
            fd = os.memfd_create(JOURNAL_NAME, os.MFD_CLOEXEC)
            os.ftruncate(fd, JOURNAL_SIZE)
            self._journal = fd
        record = str(self._manifest.seq).encode() + b"\n" + payload
        if len(record) > slot_capacity(JOURNAL_SIZE):
            raise ValueError(f"an intent of {len(record)} bytes does not fit the journal")
        self._journal_seq += 1
        self._journal_slot = 1 - self._journal_slot
        write_slot(self._journal, JOURNAL_SIZE, self._journal_slot, self._journal_seq, record)
        if not self._journal_pushed:
            self._journal_pushed = self._push(JOURNAL_NAME, self._journal, what="journal")

    def problems(self) -> list[CarrierProblem]:
        out = self._not_stored()
        if self.kexec_problem is not None:
            out.append(CarrierProblem(None, self.kexec_problem))
        return out

    def _not_stored(self) -> list[CarrierProblem]:
        """What should be in the store and is not."""
        out = [CarrierProblem(k, why) for k, why in self._failed.items()]
        manifest = self._manifest.current
        if manifest is not None and not self._pushed:
            out.append(
                CarrierProblem(
                    None,
                    f"the manifest '{manifest.name}' is not in luod's fd store: "
                    "after a restart or kexec luod would not know what it holds",
                    on_exit=True,
                )
            )
        return out

    def close(self) -> None:
        """Close luod's copies; the store keeps its own."""
        for fd in self._incoming.values():
            os.close(fd)
        self._incoming.clear()
        for fds in self._parked_in.values():
            Parking.of_fds(fds).close()
        self._parked_in.clear()
        for parking in self._parked.values():
            parking.close()  # the store keeps its own ends
        self._parked.clear()
        if self._journal >= 0:
            os.close(self._journal)
            self._journal = -1
        out = self._manifest.current
        for _name, fd in self._manifests:
            if out is None or fd != out.fd:
                os.close(fd)
        self._manifests.clear()
        self._manifest.close()

    # --- the store ------------------------------------------------------------

    def _entries(self) -> int:
        manifest = 1 if self._manifest.current is not None and self._pushed else 0
        parked = 2 * len(self._parked)
        return len(self._stored) + parked + manifest + int(self._journal_pushed)

    def _push(
        self,
        fdname: str,
        fd: int | list[int],
        what: str,
        kernel_name: str | None = None,
        entries: int = 1,
    ) -> bool:
        fields = {"name": fdname, "what": what}
        if kernel_name is not None:
            fields["kernel_name"] = kernel_name
        if self.store_max is not None and self._entries() + entries > self.store_max:
            log.error("fdstore-full", max=self.store_max, **fields)
            return False
        # FDPOLL=0: PID 1 must not drop an entry for a poll event (a session
        # fd, or a parking's end whose peer luod closed); luod removes its
        # entries itself.
        fds = fd if isinstance(fd, list) else [fd]
        if not self._send(f"FDSTORE=1\nFDNAME={fdname}\nFDPOLL=0", fds):
            log.error("fdstore-push-failed", reason="the service manager did not take it", **fields)
            return False
        log.debug("fdstore-pushed", **fields)
        return True

    def _remove(self, fdname: str) -> None:
        if not self._send(f"FDSTOREREMOVE=1\nFDNAME={fdname}", []):
            log.error("fdstore-remove-failed", name=fdname)
            return
        log.debug("fdstore-removed", name=fdname)

    def _remove_unless_used(self, fdname: str) -> None:
        """FDSTOREREMOVE removes every entry of a name: spare names in use."""
        used = set(self._stored.values())
        if self._manifest.current is not None:
            used.add(self._manifest.current.name)
        if fdname in used:
            log.warning("fdstore-entry-kept", name=fdname, reason="its name is in use")
            return
        self._remove(fdname)


def _log_unreadable(name: str, e: ManifestError) -> None:
    log.error("fdstore-manifest-unreadable", name=name, reason=e.message)
