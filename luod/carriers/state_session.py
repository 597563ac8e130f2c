"""The state-session carrier: the manifest in a LUO session of luod's own.

luod keeps its manifest in a memfd preserved in a LUO session of its own and
holds every session fd itself until the reboot syscall; luod's exit without
a kexec releases everything (see luod.carriers for when that is right).

The state session's name alternates between two well-known names, because
the kernel has no way to list incoming sessions and a new state session must
exist before the old one is dropped: a preserved memfd cannot grow, so a
manifest that outgrows its memfd moves to a new one in a new session.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from luod.carriers import CarrierOptions, CarrierProblem, IncomingState
from luod.carriers.slots import SlotMemfd, SlotWriter, newest
from luod.kernel.backend import Backend, LuoError
from luod.log import get_logger
from luod.manifest import ManifestError
from luod.notify import ListenFd

log = get_logger()

STATE_SESSION_NAMES = ("luod", "luod.b")
MANIFEST_TOKEN = 1
MANIFEST_MEMFD_NAME = "luod-manifest"


def open_carrier(
    backend: Backend, listen: Sequence[ListenFd], options: CarrierOptions
) -> StateSessionCarrier:
    """The carrier; LISTEN_FDS are closed, this carrier uses no fd store."""
    for entry in listen:
        # A store keeps its own copy: closing luod's releases nothing.
        os.close(entry.fd)
        log.warning(
            "listen-fd-closed",
            name=entry.name,
            fd=entry.fd,
            reason="the state-session carrier uses no fd store",
        )
    return StateSessionCarrier(backend)


class StateSessionCarrier:
    """The manifest in a memfd in luod's own LUO session."""

    name = "state-session"
    holds_after_exit = False

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._out_name: str | None = None  # the outgoing state session's name
        self._out_session = -1
        self._manifest = SlotWriter((MANIFEST_MEMFD_NAME,))
        self._incoming: list[tuple[str, int, int]] = []  # (name, session fd, memfd)

    def describe(self, counts: bool = True) -> str:
        out = self._manifest.current
        if self._out_name is None or out is None:
            return "state session not created yet"
        size = f" ({out.size} bytes)" if counts else ""
        return f"manifest in LUO session '{self._out_name}'{size}"

    def load(self) -> IncomingState | None:
        candidates: list[tuple[str, int | ManifestError]] = []
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
                candidates.append(
                    (name, ManifestError("corrupt", f"state session '{name}' has no manifest: {e}"))
                )
                continue
            self._incoming.append((name, sfd, mfd))
            candidates.append((name, mfd))
        found = newest(candidates)
        if found is None:
            return None
        # The incoming memfd is preserved no more: the next save() makes a
        # new one in a new state session.
        self._manifest.follow(found, write_in_it=False)
        return IncomingState(
            found.read.payload, f"session {found.name}", records=found.read.records
        )

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
        new = self._manifest.save(payload)
        if new is not None:
            self._move_to(new)

    def append(self, record: bytes) -> bool:
        # Writes into a preserved memfd are carried: the log is too.
        return self._manifest.append(record)

    def _move_to(self, new: SlotMemfd) -> None:
        """Preserve the new, larger memfd in a new state session; then drop
        the old one. Preserved memfds cannot grow, so this is the only way
        to grow."""
        session = -1
        try:
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
                self.backend.preserve_fd(session, new.fd, MANIFEST_TOKEN)
                break
            else:
                assert last is not None
                raise last
        except BaseException:
            if session >= 0:
                os.close(session)
            os.close(new.fd)
            raise
        self._drop_outgoing()
        self._out_name = name
        self._out_session = session
        self._manifest.replace(new)

    def _drop_outgoing(self) -> None:
        if self._out_session >= 0:
            os.close(self._out_session)
            self._manifest.close()
        self._out_session = -1

    def session_held(self, kernel_name: str, fd: int) -> None:
        pass  # luod itself holds the fd until the reboot syscall

    def session_dropped(self, kernel_name: str) -> None:
        pass

    def settle(self, timeout: float) -> None:
        pass  # no one but luod holds a session fd

    # luod's exit releases everything it holds (README "How custody
    # survives"): there is nothing to keep references or intents for.

    def keep_files(self, kernel_name: str, refs: Sequence[tuple[int, int]]) -> None:
        pass

    def release_files(self, kernel_name: str) -> None:
        pass

    def kept_files(self, kernel_name: str) -> dict[int, int]:
        return {}

    def release_unclaimed(self) -> None:
        pass

    def intend(self, payload: bytes) -> None:
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
