"""How luod's manifest and its session fds get across the kexec.

Two carriers:

- `StateSessionCarrier`: luod keeps its manifest in a memfd preserved in a
  LUO session of its own and holds every session fd itself until the reboot
  syscall. This needs luod alive until then: without systemd luod performs
  the reboot(KEXEC) itself; under an older systemd (< 261, no fd store over
  kexec) luod must survive the final kill, see README ("luod and shutdown").

- `FdStoreCarrier` (luod.fdstore): under systemd >= 261 luod keeps its
  session fds and the manifest memfd in its own fd store
  (FileDescriptorStorePreserve=yes): a luod restart loses nothing and PID 1
  carries them over the kexec and hands them back through LISTEN_FDS.

The state session's name alternates between two well-known names, because
the kernel has no way to list incoming sessions and a new state session must
exist before the old one is dropped.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from typing import Protocol

from luod.kernel.backend import Backend, LuoError
from luod.manifest import (
    ManifestError,
    SlotRead,
    capacity_for,
    read_newest,
    slot_capacity,
    write_slot,
)

STATE_SESSION_NAMES = ("luod", "luod.b")
MANIFEST_TOKEN = 1


@dataclasses.dataclass
class IncomingState:
    """What the previous boot left: the newest manifest, raw."""

    payload: bytes
    source: str  # e.g. "session luod"


@dataclasses.dataclass
class CarrierProblem:
    """Something the carrier failed to keep: lost at the next kexec."""

    kernel_name: str | None  # the session concerned; None for the carrier's own state
    reason: str


class Carrier(Protocol):
    name: str
    # True when what luod holds stays held after luod exits without a kexec
    # (by the service manager's fd store), False when luod's exit releases it.
    holds_after_exit: bool

    def load(self) -> IncomingState | None:
        """The incoming manifest, None on a first boot. Raises ManifestError
        when there is one but it cannot be read; then nothing is released."""
        ...

    def retrieve_session(self, kernel_name: str) -> int:
        """The fd of a session named in the manifest, owned by the caller
        from now on; a carrier with a store of its own keeps its copy
        there until session_dropped(). After a kexec it is an
        INCOMING session; after a restart in the same boot (only carriers
        that hold sessions across luod's exit) the OUTGOING session as the
        previous luod left it. LuoError when the carrier has no such session."""
        ...

    def finish_incoming(self) -> None:
        """Everything in the manifest was taken over (or nothing came over);
        drop the old state and whatever the manifest does not name."""
        ...

    def save(self, payload: bytes) -> None:
        """Make `payload` the manifest the next boot will read."""
        ...

    def session_held(self, kernel_name: str, fd: int) -> None:
        """luod now holds the session fd `fd` (pushed to an fd store, say);
        nothing to do for a session that came from retrieve_session()."""
        ...

    def session_dropped(self, kernel_name: str) -> None: ...

    def problems(self) -> list[CarrierProblem]:
        """What the carrier failed to keep; the preflight check reports it."""
        ...

    def describe(self) -> str: ...


class StateSessionCarrier:
    """The manifest in a memfd in luod's own LUO session."""

    name = "state-session"
    holds_after_exit = False

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._out_name: str | None = None
        self._out_session = -1
        self._out_memfd = -1
        self._out_size = 0
        self._out_slot = 1  # the slot written last; the next write goes to the other
        self._seq = 0
        self._incoming: list[tuple[str, int, int]] = []  # (name, session fd, memfd)

    def describe(self) -> str:
        if self._out_name is None:
            return "state session not created yet"
        return f"manifest in LUO session '{self._out_name}' ({self._out_size} bytes)"

    def load(self) -> IncomingState | None:
        best: tuple[SlotRead, str] | None = None
        broken: ManifestError | None = None
        for name in STATE_SESSION_NAMES:
            try:
                sfd = self.backend.retrieve_session(name)
            except LuoError as e:
                if e.errno == errno.ENOENT:
                    continue
                raise
            try:
                mfd = self.backend.retrieve_fd(sfd, MANIFEST_TOKEN)
            except LuoError as e:
                # Keep the session: finishing it would release what it holds.
                self._incoming.append((name, sfd, -1))
                broken = ManifestError("corrupt", f"state session '{name}' has no manifest: {e}")
                continue
            self._incoming.append((name, sfd, mfd))
            try:
                read = read_newest(mfd)
            except ManifestError as e:
                broken = e
                continue
            if best is None or read.seq > best[0].seq:
                best = (read, name)
        if best is None:
            if broken is not None:
                raise broken
            return None
        self._seq = best[0].seq
        return IncomingState(best[0].payload, f"session {best[1]}")

    def retrieve_session(self, kernel_name: str) -> int:
        return self.backend.retrieve_session(kernel_name)

    def finish_incoming(self) -> None:
        for _name, sfd, mfd in self._incoming:
            if mfd >= 0:
                os.close(mfd)
            try:
                self.backend.finish_session(sfd)
            finally:
                os.close(sfd)
        self._incoming.clear()

    def save(self, payload: bytes) -> None:
        self._seq += 1
        if self._out_memfd >= 0 and len(payload) <= slot_capacity(self._out_size):
            slot = 1 - self._out_slot
            write_slot(self._out_memfd, self._out_size, slot, self._seq, payload)
            self._out_slot = slot
            return
        self._rebuild(payload)

    def _rebuild(self, payload: bytes) -> None:
        """A new, larger memfd in a new state session; then drop the old one.
        Preserved memfds cannot grow, so this is the only way to grow."""
        size = capacity_for(len(payload))
        memfd = os.memfd_create("luod-manifest", os.MFD_CLOEXEC)
        session = -1
        try:
            os.ftruncate(memfd, size)
            write_slot(memfd, size, 0, self._seq, payload)
            names = [n for n in STATE_SESSION_NAMES if n != self._out_name]
            last: LuoError | None = None
            for name in names:
                try:
                    session = self.backend.create_session(name)
                except LuoError as e:
                    if e.errno != errno.EEXIST:
                        raise
                    last = e
                    continue
                self.backend.preserve_fd(session, memfd, MANIFEST_TOKEN)
                break
            else:
                assert last is not None
                raise last
        except BaseException:
            if session >= 0:
                os.close(session)
            os.close(memfd)
            raise
        self._drop_outgoing()
        self._out_name = name
        self._out_session, self._out_memfd, self._out_size, self._out_slot = session, memfd, size, 0

    def _drop_outgoing(self) -> None:
        if self._out_session >= 0:
            os.close(self._out_session)
            os.close(self._out_memfd)
        self._out_session = self._out_memfd = -1

    def session_held(self, kernel_name: str, fd: int) -> None:
        pass  # luod itself holds the fd until the reboot syscall

    def session_dropped(self, kernel_name: str) -> None:
        pass

    def problems(self) -> list[CarrierProblem]:
        return []  # a failure to save raises from save()

    def close(self) -> None:
        self._drop_outgoing()
        for _name, sfd, mfd in self._incoming:
            os.close(sfd)
            if mfd >= 0:
                os.close(mfd)
        self._incoming.clear()
