"""Custody operations: what a client may do with the sessions and files luod
holds for it, and when luod lets go of them.

`Custodian` is the one object the varlink layer and the daemon talk to: the
operations clients call (create, hand off, adopt, delegate, list, retrieve,
discard), who may call them on what (a session's owner, or root), and the
entry points of reclaim and of the grace period after a kexec
(luod.reclaim) and of the preflight check (luod.preflight). It returns
domain objects (luod.model), never wire shapes. The record of what is
held, and the steps that keep kernel, carrier and manifest in agreement,
are luod.ledger's.

Every method that receives an fd takes ownership of it: it is either kept
(in a Session) or closed before the method returns, also on error. Every
method that returns an fd hands ownership to the caller.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence

import structlog

from luod import errors
from luod.carriers import Carrier
from luod.kernel import fdinfo
from luod.kernel.backend import Backend, LuoError
from luod.ledger import Ledger
from luod.model import HeldFile, Holdings, Owner, Session, SessionKind, SessionState
from luod.names import MAX_KERNEL_SESSION_NAME, check_fd_name, check_session_name
from luod.peer import Peer
from luod.preflight import Problem
from luod.preflight import check as preflight_check
from luod.reclaim import Reclaimer, ReclaimReport

__all__ = ["Custodian", "Handoff", "Holdings", "Problem", "ReclaimReport", "owner_of"]

log = structlog.get_logger("luod")


def owner_of(peer: Peer) -> Owner:
    return Owner(uid=peer.uid, unit=peer.unit, comm=peer.comm)


@dataclasses.dataclass
class Handoff:
    """A file a client hands off: its name, fd (owned), and where in the
    call it came from."""

    name: str
    fd: int
    # Where in the call it came from, e.g. "files[2]"; "" for top-level parameters.
    where: str = ""

    def parameter(self, field: str) -> str:
        return f"{self.where}.{field}" if self.where else field


class Custodian:
    def __init__(
        self,
        backend: Backend,
        carrier: Carrier,
        grace: float = 600.0,
        clock: Callable[[], float] = time.time,
        boot_id: str = "",
    ) -> None:
        self.ledger = Ledger(backend, carrier, clock, boot_id)
        self._reclaimer = Reclaimer(self.ledger, grace)

    # --- what the daemon and the varlink layer read ----------------------------

    @property
    def backend(self) -> Backend:
        return self.ledger.backend

    @property
    def carrier(self) -> Carrier:
        return self.ledger.carrier

    @property
    def clock(self) -> Callable[[], float]:
        return self.ledger.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self.ledger.clock = clock

    @property
    def grace(self) -> float:
        """How long after a kexec an owner has to claim what came with it."""
        return self._reclaimer.grace

    @property
    def kexec_count(self) -> int:
        return self.ledger.kexec_count

    @property
    def reclaim(self) -> ReclaimReport | None:
        """What start() found; None before it ran."""
        return self._reclaimer.report

    @property
    def previous_subscribers(self) -> dict[str, int]:
        """Who subscribed in the boot before the last kexec (name -> uid)."""
        return self.ledger.previous_subscribers

    @property
    def sessions(self) -> dict[str, Session]:
        """Every session held, by name: for the custody modules and tests.
        Everyone else goes through list_sessions() (which checks the peer),
        status() or session_count."""
        return self.ledger.sessions

    @property
    def session_count(self) -> int:
        return len(self.ledger.sessions)

    def status(self) -> Holdings:
        return self.ledger.holdings()

    def note_subscriber(self, name: str, uid: int) -> None:
        self.ledger.note_subscriber(name, uid)

    # --- reclaim ---------------------------------------------------------------

    def start(self) -> ReclaimReport:
        """Take over what the previous kernel carried, if anything."""
        return self._reclaimer.start()

    def preserve_again(self, name: str | None = None) -> bool:
        """Preserve one session that came over the kexec again (`name`, or
        the next one waiting); True while more are waiting."""
        return self._reclaimer.preserve_again(name)

    def preserve_all_again(self) -> None:
        self._reclaimer.preserve_all_again()

    # --- access ----------------------------------------------------------------

    def _lookup(self, peer: Peer, name: str) -> Session:
        """The session `name` if `peer` may see it: its owner, or root."""
        s = self.ledger.sessions.get(name)
        if s is None:
            raise errors.NoSuchSession(name)
        if not peer.is_root and peer.uid != s.owner.uid:
            raise errors.PermissionDenied(name, s.owner.describe())
        return s

    def _session(self, peer: Peer, name: str, preserve_again: bool = True) -> Session:
        """The session `name` if `peer` may use it; preserved again first
        unless the caller only reads (a copy of a file needs no session
        preserved again). Using a session claims it."""
        s = self._lookup(peer, name)
        if preserve_again and name in self.ledger.awaiting_preservation:
            self.preserve_again(name)
        if s.claim_deadline is not None:
            s.claim_deadline = None
            log.info(
                "session-claimed", session=s.name, owner=s.owner.describe(), by=peer.describe()
            )
        return s

    # --- client operations -----------------------------------------------------

    def _new_session(self, peer: Peer, name: str, kind: SessionKind) -> Session:
        """A new outgoing kernel session, named for luod, owned by `peer`."""
        ledger = self.ledger
        ledger.require_usable()
        check_session_name(name)
        if name in ledger.sessions:
            raise errors.SessionExists(name)
        kernel_name = ledger.new_kernel_name(name)
        try:
            sfd = ledger.backend.create_session(kernel_name)
        except LuoError as e:
            raise errors.KernelRefused("create_session", e.errno, e.message, name) from None
        s = Session(
            name=name,
            kind=kind,
            owner=owner_of(peer),
            kernel_name=kernel_name,
            created_at=ledger.clock(),
            fd=sfd,
            kexec_count=ledger.kexec_count,
        )
        ledger.sessions[name] = s
        ledger.carrier.session_held(kernel_name, sfd)
        ledger.save()
        log.info(
            "session-created",
            session=name,
            kind=kind.value,
            kernel_name=kernel_name,
            owner=s.owner.describe(),
        )
        return s

    def create_session(self, peer: Peer, name: str) -> Session:
        return self._new_session(peer, name, SessionKind.MANAGED)

    def preserve_fds(
        self, peer: Peer, session: str, files: Sequence[Handoff], create: bool = False
    ) -> list[HeldFile]:
        """Hand off memfds into a managed session. All or nothing."""
        try:
            return self._preserve_fds(peer, session, files, create)
        finally:
            for h in files:
                if h.fd >= 0:
                    os.close(h.fd)

    def _preserve_fds(
        self, peer: Peer, session: str, files: Sequence[Handoff], create: bool
    ) -> list[HeldFile]:
        ledger = self.ledger
        ledger.require_usable()
        # Files that came over the kexec are indexed (AlreadyPreserved) when
        # their session is preserved again.
        self.preserve_all_again()
        created = False
        if create and session not in ledger.sessions:
            check_session_name(session)
        else:
            s = self._session(peer, session)
            if s.kind is not SessionKind.MANAGED:
                raise errors.WrongSessionKind(
                    session, s.kind.value, "files can only be handed off into sessions luod manages"
                )
            if len(files) > 1 and any(f.fd < 0 for f in s.files.values()):
                # Undoing a half-done batch rebuilds the session from all its
                # files; one file alone needs no undoing.
                raise errors.NotReady(
                    f"luod was restarted and holds no reference to the files in '{session}' "
                    "until the next kexec, so it could not undo a failed batch: hand off "
                    "one file per call"
                )
        names: set[str] = set()
        checked: list[fdinfo.FdFacts] = []
        for h in files:
            check_fd_name(h.name, h.parameter("name"))
            if h.name in names or (
                session in ledger.sessions and h.name in ledger.sessions[session].files
            ):
                raise errors.FdNameExists(session, h.name)
            names.add(h.name)
            facts = fdinfo.inspect_fd(h.fd)
            if facts.kind is not fdinfo.FdKind.MEMFD:
                raise errors.UnsupportedFd(
                    h.parameter("fileDescriptor"), facts.kind.value, _refusal(facts)
                )
            held = ledger.holder_of((facts.dev, facts.ino))
            if held is not None:
                raise errors.AlreadyPreserved(h.parameter("fileDescriptor"), held[0], held[1])
            checked.append(facts)
        if session not in ledger.sessions:
            self.create_session(peer, session)
            created = True
        s = ledger.sessions[session]
        now = ledger.clock()
        added: list[HeldFile] = []
        try:
            for h, facts in zip(files, checked, strict=True):
                f = HeldFile(
                    name=h.name,
                    token=s.next_token(),
                    size=facts.size,
                    preserved_at=now,
                    fd=h.fd,
                )
                ledger.backend.preserve_fd(s.fd, f.fd, f.token)
                h.fd = -1  # owned by the session from here on
                added.append(f)
                s.files[f.name] = f
                ledger.index(s, f, (facts.dev, facts.ino))
        except LuoError as e:
            self._rollback(s, added, created)
            raise errors.KernelRefused("preserve_fd", e.errno, e.message, session) from None
        ledger.save()
        if len(added) == 1:
            (f,) = added
            log.info(
                "fd-preserved",
                session=s.name,
                name=f.name,
                token=f.token,
                size=f.size,
                owner=s.owner.describe(),
            )
        elif added:
            # One line for a batch: a line per fd cost more than the
            # preserve itself (bench/RESULTS.md); every name is still in it.
            log.info(
                "fds-preserved",
                session=s.name,
                names=",".join(f.name for f in added),
                tokens=f"{added[0].token}-{added[-1].token}",
                count=len(added),
                bytes=sum(f.size for f in added),
                owner=s.owner.describe(),
            )
        return added

    def _rollback(self, s: Session, added: list[HeldFile], created: bool) -> None:
        """Undo a partial hand-off: nothing may change on bad input."""
        ledger = self.ledger
        for f in added:
            ledger.unindex(f)
            del s.files[f.name]
            f.close()
        if created:
            ledger.drop(s, "hand-off failed")
        elif added:
            ledger.represerve(s, s.files.values())
        ledger.save()

    def adopt_session(self, peer: Peer, fd: int, parameter: str = "fileDescriptor") -> Session:
        """Hold a session fd the client created itself, as it is."""
        ledger = self.ledger
        try:
            ledger.require_usable()
            name = ledger.backend.identify_session(fd)
            if name is None:
                facts = fdinfo.inspect_fd(fd)
                raise errors.UnsupportedFd(
                    parameter, facts.kind.value, f"not a LUO session: {facts.describe()}"
                )
            check_session_name(name, "session", limit=MAX_KERNEL_SESSION_NAME)
            if name in ledger.sessions:
                raise errors.SessionExists(name)
        except BaseException:
            os.close(fd)
            raise
        s = Session(
            name=name,
            kind=SessionKind.ADOPTED,
            owner=owner_of(peer),
            kernel_name=name,
            created_at=ledger.clock(),
            fd=fd,
            kexec_count=ledger.kexec_count,
        )
        ledger.sessions[name] = s
        ledger.carrier.session_held(name, fd)
        ledger.save()
        log.info("session-adopted", session=name, owner=s.owner.describe())
        return s

    def create_delegated(self, peer: Peer, name: str) -> tuple[int, Session]:
        """A session for the client to preserve its own files into (device
        fds that only the owning process may touch, say). luod keeps a
        reference, so the session survives the client's restart or crash and
        the shutdown; after the kexec the owner takes it back whole."""
        s = self._new_session(peer, name, SessionKind.DELEGATED)
        return os.dup(s.fd), s

    def list_sessions(self, peer: Peer, session: str | None = None) -> list[Session]:
        if session is not None:
            return [self._lookup(peer, session)]
        return [s for s in self.ledger.sessions.values() if peer.is_root or s.owner.uid == peer.uid]

    def retrieve_fd(self, peer: Peer, session: str, name: str, take: bool) -> tuple[int, HeldFile]:
        """A copy of a held file (custody goes on), or the file itself (custody ends)."""
        ledger = self.ledger
        s = self._session(peer, session, preserve_again=take)
        f = s.files.get(name)
        if f is None:
            raise errors.NoSuchFd(session, name)
        if f.fd < 0:
            raise errors.NotReady(
                f"luod holds no reference to '{session}/{name}' in this boot (luod was "
                "restarted; the kernel cannot hand a file back out of an outgoing session): "
                "it is carried over the next kexec and can be retrieved after it"
            )
        remaining = [x for x in s.files.values() if x is not f]
        if take and any(x.fd < 0 for x in remaining):
            # Taking one file rebuilds the session from the others, which
            # luod holds no reference to since its restart.
            raise errors.NotReady(
                f"'{session}/{name}' can only be copied until the next kexec: luod was "
                f"restarted and holds no reference to the other files of '{session}', "
                "which taking one would have to preserve again"
            )
        # A dup shares the open file description, so the client sees the
        # file position the file has, as it would after the kexec.
        out = os.dup(f.fd)
        if not take:
            log.info(
                "fd-copied",
                session=s.name,
                name=f.name,
                owner=s.owner.describe(),
                to=peer.describe(),
            )
            return out, f
        try:
            if remaining:
                ledger.represerve(s, remaining)
        except LuoError as e:
            os.close(out)
            raise errors.KernelRefused("preserve_fd", e.errno, e.message, session) from None
        ledger.unindex(f)
        del s.files[name]
        f.close()
        if not remaining:
            ledger.drop(s, "its last fd was taken")
        ledger.save()
        log.info(
            "fd-taken", session=session, name=name, owner=s.owner.describe(), by=peer.describe()
        )
        return out, f

    def retrieve_session(self, peer: Peer, session: str) -> tuple[int, Session]:
        """An adopted or delegated session's fd for its owner, and the
        session as the owner found it (before this call claimed it). Before
        the kexec a copy: luod must go on holding it for it to be carried (a
        client that restarted gets its session back this way). After the
        kexec the session itself: custody ends."""
        ledger = self.ledger
        found = ledger.sessions.get(session)
        deadline = None if found is None else found.claim_deadline
        s = self._session(peer, session)
        if s.kind is SessionKind.MANAGED:
            raise errors.WrongSessionKind(
                session,
                s.kind.value,
                "only sessions a client created itself are handed back whole; use RetrieveFd",
            )
        if s.fd < 0:
            raise errors.NotReady(f"luod holds no fd for session '{session}'")
        seen = dataclasses.replace(s, claim_deadline=deadline)
        if s.state is SessionState.OUTGOING:
            log.info(
                "session-copied", session=session, owner=s.owner.describe(), to=peer.describe()
            )
            return os.dup(s.fd), seen
        fd, s.fd = s.fd, -1
        del ledger.sessions[session]
        ledger.carrier.session_dropped(s.kernel_name)
        ledger.save()
        log.info(
            "session-returned",
            session=session,
            state=s.state.value,
            owner=s.owner.describe(),
            to=peer.describe(),
        )
        return fd, seen

    def discard_session(self, peer: Peer, session: str) -> Session:
        # Nothing to preserve again in what is let go of (drop closes it as
        # it is).
        s = self._session(peer, session, preserve_again=False)
        self.ledger.drop(s, f"discarded by {peer.describe()}")
        self.ledger.save()
        return s

    # --- the grace period after a kexec ----------------------------------------

    def next_deadline(self) -> float | None:
        """When the next unclaimed session is to be released, if any is."""
        return self._reclaimer.next_deadline()

    def expire(self) -> list[str]:
        """Release what nobody claimed within the grace period."""
        return self._reclaimer.expire()

    # --- preflight and shutdown ------------------------------------------------

    def check(self) -> list[Problem]:
        """What would be lost if the kexec happened now, and why."""
        self.preserve_all_again()
        return preflight_check(self.ledger)

    def close(self) -> None:
        """luod is stopping without a kexec (tests, fallback): close all."""
        self.ledger.close()


def _refusal(facts: fdinfo.FdFacts) -> str:
    if facts.kind is fdinfo.FdKind.LUO_SESSION:
        return "this is a LUO session; hand it over with AdoptSession, sessions are not nested"
    if facts.kind is fdinfo.FdKind.HUGETLB_MEMFD:
        return "the kernel cannot preserve hugetlb memfds"
    return f"the kernel can only preserve memfds (and tmpfs O_TMPFILE files); this is {facts.describe()}"
