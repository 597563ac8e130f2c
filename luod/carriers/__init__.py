"""How luod's manifest and its session fds get across the kexec: the carriers.

A carrier is the one part of luod that knows where the manifest and the
session fds are kept until the next boot. This package holds the small
interface the core talks to (`Carrier`) and the choice of one; each carrier
is a module of its own, picked by name:

- `state-session` (luod.carriers.state_session): luod keeps its manifest in
  a memfd preserved in a LUO session of its own and holds every session fd
  itself until the reboot syscall. This needs luod alive until then: without
  systemd luod performs the reboot(KEXEC) itself; under an older systemd
  (< 261, no fd store over kexec) luod must survive the final kill, see
  README ("luod and shutdown").

- `fdstore` (luod.carriers.fdstore): under systemd >= 261 luod keeps its
  session fds and the manifest memfd in its own fd store
  (FileDescriptorStorePreserve=yes): a luod restart loses nothing and PID 1
  carries them over the kexec and hands them back through LISTEN_FDS.

Both keep the manifest in the two-slot memfd of luod.carriers.slots.
A new carrier is a module here with an `open_carrier()` (see
`CarrierFactory`) and a line in `CARRIERS`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Mapping, Sequence
from typing import Protocol

from luod.kernel.backend import Backend
from luod.log import get_logger
from luod.notify import ListenFd
from luod.record import record

log = get_logger()


@record
class IncomingState:
    """What the previous boot (or the previous luod) left: the newest
    manifest, raw, and the intent recorded after it (`intend`), if any:
    a change begun and not committed when that luod died."""

    payload: bytes
    source: str  # e.g. "session luod"
    intent: bytes | None = None
    # Changes appended after the manifest `payload` (append()), in order.
    records: list[bytes] = dataclasses.field(default_factory=list)


@record
class CarrierProblem:
    """Something the carrier failed to keep: lost at the next kexec."""

    kernel_name: str | None  # the session concerned; None for the carrier's own state
    reason: str
    # Lost at luod's exit already, not only at the next kexec (the manifest
    # is not where a restarted luod finds it, say).
    on_exit: bool = False


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

    def append(self, record: bytes) -> bool:
        """Record a change of the manifest (luod.manifest.change_json) after
        the last one; False when the carrier wants the whole manifest
        instead (save())."""
        ...

    def session_held(self, kernel_name: str, fd: int) -> None:
        """luod now holds the session fd `fd` (pushed to an fd store, say);
        nothing to do for a session that came from retrieve_session()."""
        ...

    def session_dropped(self, kernel_name: str) -> None: ...

    def settle(self, timeout: float) -> None:
        """Return once the sessions dropped so far are let go of by whoever
        held copies of them (the service manager, which does so when it
        gets to luod's message), or after `timeout` seconds."""
        ...

    def keep_files(self, kernel_name: str, refs: Sequence[tuple[int, int]]) -> None:
        """Keep luod's own references to files of the kernel session
        `kernel_name` ((token, fd) pairs, added to those kept already)
        where a crash of luod cannot drop them (the fd store), so that a
        restarted luod has them at once; nothing for a carrier that keeps
        nothing across luod's exit."""
        ...

    def release_files(self, kernel_name: str) -> None:
        """Let go of every reference kept for `kernel_name`."""
        ...

    def kept_files(self, kernel_name: str) -> dict[int, int]:
        """The references the previous luod kept for `kernel_name` (a
        restart in the same boot, or one in the middle of preserving again
        after a kexec): token -> fd, owned by the caller; the carrier keeps
        its own until release_files()."""
        ...

    def release_unclaimed(self) -> None:
        """Release what the previous luod left and the manifest does not
        name (every session and kept file not taken with retrieve_session()
        or kept_file()): the remains of a change it did not commit."""
        ...

    def intend(self, payload: bytes) -> None:
        """Record the change about to be made (write-ahead), before its
        first kernel step; it is void once the next save() commits. A
        carrier that keeps nothing across luod's exit needs no record."""
        ...

    def problems(self) -> list[CarrierProblem]:
        """What the carrier failed to keep; the preflight check reports it."""
        ...

    def describe(self, counts: bool = True) -> str:
        """How luod's state is carried, for GetStatus. `counts`: with what
        it holds in all (sessions, references, sizes), which is root's to
        know, not every uid's."""
        ...

    def close(self) -> None:
        """Close luod's own fds of the carrier (tests, shutdown)."""
        ...


@record(frozen=True)
class CarrierOptions:
    """What a carrier may need to start, beyond the backend."""

    # $FDSTORE, $NOTIFY_SOCKET and the like: the service manager's offer.
    environ: Mapping[str, str]
    # The service manager's varlink socket (luod --service-manager).
    service_manager: str


class CarrierFactory(Protocol):
    """A carrier module's `open_carrier`. It owns `listen` (LISTEN_FDS but
    the varlink socket) from the call on."""

    def __call__(
        self, backend: Backend, listen: Sequence[ListenFd], options: CarrierOptions
    ) -> Carrier: ...


# Carrier name (luod --carrier) -> the module implementing it.
CARRIERS = {
    "state-session": "luod.carriers.state_session",
    "fdstore": "luod.carriers.fdstore",
}


def store_max_from_env(value: str | None) -> int | None:
    """$FDSTORE (systemd >= 254: the unit's FileDescriptorStoreMax=), or None."""
    try:
        n = int(value or "")
    except ValueError:
        return None
    return n if n > 0 else None


def choose_carrier(requested: str, environ: Mapping[str, str]) -> tuple[str, str]:
    """The carrier to use and why."""
    if requested != "auto":
        return requested, f"--carrier={requested}"
    if not environ.get("NOTIFY_SOCKET"):
        return "state-session", "no service manager ($NOTIFY_SOCKET is not set)"
    store_max = store_max_from_env(environ.get("FDSTORE"))
    if store_max is None:
        return "state-session", "the service has no fd store ($FDSTORE is not a positive number)"
    return "fdstore", f"the service has an fd store of {store_max} entries ($FDSTORE)"


def make_carrier(
    requested: str,
    backend: Backend,
    listen: Sequence[ListenFd],
    *,
    service_manager: str,
    environ: Mapping[str, str] | None = None,
) -> Carrier:
    """The carrier `requested` ('auto' or a name of CARRIERS); it owns
    `listen` (LISTEN_FDS but the varlink socket). SystemExit when the
    chosen carrier cannot work here."""
    env = dict(os.environ) if environ is None else environ
    chosen, why = choose_carrier(requested, env)
    if chosen not in CARRIERS:
        raise ValueError(f"unknown carrier {chosen!r} (known: {', '.join(CARRIERS)})")
    log.info("carrier-chosen", carrier=chosen, reason=why)
    module = importlib.import_module(CARRIERS[chosen])
    factory: CarrierFactory = module.open_carrier
    return factory(backend, listen, CarrierOptions(env, service_manager))
