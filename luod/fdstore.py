"""`FdStoreCarrier`: luod's session fds and its manifest in luod's own fd store.

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

The manifest keeps the two-slot format of luod.manifest. A memfd in the
store is not preserved before shutdown, so it could grow; but a new, larger
memfd under the other name is pushed before the old one is removed, so the
store always holds one complete manifest, also when luod dies in between
(load() then takes the newer of the two).
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Callable, Sequence

import structlog

from luod import notify
from luod.carrier import CarrierProblem, IncomingState
from luod.kernel import fdinfo
from luod.kernel.backend import Backend, LuoError
from luod.manifest import (
    ManifestError,
    SlotRead,
    capacity_for,
    read_newest,
    slot_capacity,
    write_slot,
)
from luod.notify import ListenFd

log = structlog.get_logger("luod")

MANIFEST_NAMES = ("luod-manifest-a", "luod-manifest-b")
SESSION_FDNAME_PREFIX = "session."
VARLINK_FDNAME = "varlink"

# notify.notify's signature: send a message with fds, True when it went out.
Send = Callable[[str, Sequence[int]], bool]


def fdname_for(kernel_name: str) -> str:
    """The FDNAME a session fd is stored under.

    A valid fd name is printable ASCII without ':' (the separator of
    LISTEN_FDNAMES) and at most 255 characters. Session names may contain
    ':', so it and everything else outside printable ASCII is percent-encoded
    ('%' too, so that two session names never share an fd name). 63 bytes
    of name give at most 8 + 3 * 63 = 197 characters."""
    out: list[str] = []
    for b in kernel_name.encode():
        if 0x20 < b < 0x7F and b not in b":%":
            out.append(chr(b))
        else:
            out.append(f"%{b:02X}")
    return SESSION_FDNAME_PREFIX + "".join(out)


def store_max_from_env(value: str | None) -> int | None:
    """$FDSTORE (systemd >= 254: the unit's FileDescriptorStoreMax=), or None."""
    try:
        n = int(value or "")
    except ValueError:
        return None
    return n if n > 0 else None


@dataclasses.dataclass
class _ManifestFd:
    """The manifest memfd luod writes to, and whether the store has it."""

    name: str
    fd: int
    size: int
    slot: int  # the slot written last; the next write goes to the other
    pushed: bool


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
        self._out: _ManifestFd | None = None
        self._seq = 0
        self._failed: dict[str, str] = {}  # kernel name -> why its push failed
        for entry in listen:
            self._sort(entry)

    # --- LISTEN_FDS -----------------------------------------------------------

    def _sort(self, entry: ListenFd) -> None:
        """Keep a manifest memfd or a LUO session; close anything else."""
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

    def describe(self) -> str:
        if self._out is None:
            manifest = "no manifest yet"
        else:
            manifest = f"manifest '{self._out.name}' ({self._out.size} bytes)"
        limit = f" of at most {self.store_max}" if self.store_max is not None else ""
        text = f"fd store: {manifest}, {len(self._stored)} session fds{limit}"
        if self.kexec_problem is not None:
            text += "; NOT carried over a kexec by the service manager"
        not_stored = self._not_stored()
        if not_stored:
            text += f"; {len(not_stored)} not in the store"
        return text

    def load(self) -> IncomingState | None:
        best: tuple[SlotRead, str, int] | None = None
        broken: ManifestError | None = None
        for name, fd in self._manifests:
            try:
                read = read_newest(fd)
            except ManifestError as e:
                log.error("fdstore-manifest-unreadable", name=name, reason=e.message)
                broken = e
                continue
            if best is None or read.seq > best[0].seq:
                best = (read, name, fd)
        if best is None:
            if broken is not None:
                raise broken
            if self._incoming:
                raise ManifestError(
                    "corrupt",
                    f"luod's fd store holds {len(self._incoming)} LUO sessions but no manifest "
                    f"({', '.join(sorted(self._incoming))}): nobody knows what they hold",
                )
            return None
        read, name, fd = best
        self._seq = read.seq
        # The incoming manifest memfd is in the store already: write on in it.
        self._out = _ManifestFd(name, fd, os.fstat(fd).st_size, read.slot, pushed=True)
        return IncomingState(read.payload, f"fd store entry '{name}'")

    def retrieve_session(self, kernel_name: str) -> int:
        fd = self._incoming.pop(kernel_name, None)
        if fd is None:
            raise LuoError("retrieve_session", errno.ENOENT, f"{kernel_name} (not in the fd store)")
        return fd

    def finish_incoming(self) -> None:
        """Release what the manifest does not name: session fds nobody
        claimed (their store entry goes too, so the kernel drops them), an
        older manifest, and entries closed as unknown."""
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
        for name, fd in self._manifests:
            if self._out is not None and fd == self._out.fd:
                continue
            os.close(fd)
            self._remove_unless_used(name)
            log.info("fdstore-manifest-dropped", name=name, reason="an older manifest")
        self._manifests.clear()
        for name in sorted(self._junk):
            self._remove_unless_used(name)
        self._junk.clear()

    def save(self, payload: bytes) -> None:
        self._seq += 1
        out = self._out
        if out is None or len(payload) > slot_capacity(out.size):
            self._rebuild(payload)
            return
        slot = 1 - out.slot
        write_slot(out.fd, out.size, slot, self._seq, payload)
        out.slot = slot
        if not out.pushed:
            out.pushed = self._push(out.name, out.fd, what="manifest")

    def _rebuild(self, payload: bytes) -> None:
        """A new, larger manifest memfd under the other name, pushed before
        the old one is removed."""
        old = self._out
        name = MANIFEST_NAMES[0]
        if old is not None and old.name == name:
            name = MANIFEST_NAMES[1]
        size = capacity_for(len(payload))
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            write_slot(fd, size, 0, self._seq, payload)
        except BaseException:
            os.close(fd)
            raise
        pushed = self._push(name, fd, what="manifest")
        self._out = _ManifestFd(name, fd, size, 0, pushed)
        log.info("fdstore-manifest-created", name=name, size=size, pushed=pushed)
        if old is not None:
            # Even if the new one did not reach the store: an old manifest
            # would name fewer sessions than the store holds, and the next
            # luod would release the rest. No manifest releases nothing.
            if old.pushed:
                self._remove(old.name)
            os.close(old.fd)

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

    def problems(self) -> list[CarrierProblem]:
        out = self._not_stored()
        if self.kexec_problem is not None:
            out.append(CarrierProblem(None, self.kexec_problem))
        return out

    def _not_stored(self) -> list[CarrierProblem]:
        """What should be in the store and is not."""
        out = [CarrierProblem(k, why) for k, why in self._failed.items()]
        if self._out is not None and not self._out.pushed:
            out.append(
                CarrierProblem(
                    None,
                    f"the manifest '{self._out.name}' is not in luod's fd store: "
                    "after a restart or kexec luod would not know what it holds",
                )
            )
        return out

    def close(self) -> None:
        """Close luod's copies; the store keeps its own."""
        for fd in self._incoming.values():
            os.close(fd)
        self._incoming.clear()
        for _name, fd in self._manifests:
            if self._out is None or fd != self._out.fd:
                os.close(fd)
        self._manifests.clear()
        if self._out is not None:
            os.close(self._out.fd)
            self._out = None

    # --- the store ------------------------------------------------------------

    def _entries(self) -> int:
        return len(self._stored) + (1 if self._out is not None and self._out.pushed else 0)

    def _push(self, fdname: str, fd: int, what: str, kernel_name: str | None = None) -> bool:
        fields = {"name": fdname, "what": what}
        if kernel_name is not None:
            fields["kernel_name"] = kernel_name
        if self.store_max is not None and self._entries() >= self.store_max:
            log.error("fdstore-full", max=self.store_max, **fields)
            return False
        # FDPOLL=0: PID 1 must not drop a session fd for a poll event; luod
        # removes its entries itself.
        if not self._send(f"FDSTORE=1\nFDNAME={fdname}\nFDPOLL=0", [fd]):
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
        if self._out is not None:
            used.add(self._out.name)
        if fdname in used:
            log.warning("fdstore-entry-kept", name=fdname, reason="its name is in use")
            return
        self._remove(fdname)
