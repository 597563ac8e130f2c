"""Custody operations: what a client may do with the sessions and files luod
holds for it, and when luod lets go of them.

`Custodian` is the one object the varlink layer and the daemon talk to: the
operations clients call (create, hand off, adopt, delegate, list, retrieve,
discard), who may call them on what, and the
entry points of reclaim and of the grace period after a kexec
(luod.reclaim) and of the preflight check (luod.preflight). It returns
domain objects (luod.model), never wire shapes. The record of what is
held, and the steps that keep kernel, carrier and manifest in agreement,
are luod.ledger's; the hand-off itself (PreserveFd, PreserveFds) is
luod.handoff's, and how much each uid may hold luod.quotas'.

Session names are scoped by owner (uid): every call addresses the caller's
own sessions, and a name another uid holds is, to the caller, no session at
all. Root acts on another uid's session only when it says so (`owner`), and
that is logged (`for`). Nothing joins, creates into or reveals another
owner's session implicitly.

Every method that receives an fd takes ownership of it: it is either kept
(in a Session) or closed before the method returns, also on error. Every
method that returns an fd hands ownership to the caller.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence

from luod import errors, handoff
from luod.carriers import Carrier
from luod.crashpoint import reached
from luod.handoff import Handoff
from luod.kernel import fdinfo
from luod.kernel.backend import Backend, LuoError, is_incoming_session
from luod.ledger import REPRESERVE_PATIENCE, Ledger
from luod.log import get_logger
from luod.model import (
    HeldFile,
    HeldFiles,
    Holdings,
    Owner,
    Session,
    SessionKey,
    SessionKind,
    SessionState,
)
from luod.names import MAX_KERNEL_SESSION_NAME, check_session_name
from luod.peer import Peer
from luod.preflight import Problem
from luod.preflight import check as preflight_check
from luod.quotas import Quotas
from luod.reclaim import Reclaimer, ReclaimReport

__all__ = ["Custodian", "Handoff", "Holdings", "Problem", "ReclaimReport", "owner_of"]

log = get_logger()


def owner_of(peer: Peer) -> Owner:
    return Owner(uid=peer.uid, unit=peer.unit, comm=peer.comm)


class Custodian:
    def __init__(
        self,
        backend: Backend,
        carrier: Carrier,
        grace: float = 600.0,
        clock: Callable[[], float] = time.time,
        boot_id: str = "",
        quotas: Quotas | None = None,
    ) -> None:
        self.ledger = Ledger(backend, carrier, clock, boot_id)
        self.quotas = quotas or Quotas()
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
    def previous_subscribers(self) -> set[tuple[str, int]]:
        """Who subscribed in the boot before the last kexec: (name, uid)."""
        return self.ledger.previous_subscribers

    @property
    def sessions(self) -> Mapping[SessionKey, Session]:
        """Every session held, by (owner uid, name): for the custody modules and tests.
        Everyone else goes through list_sessions() (which checks the peer),
        status() or session_count."""
        return self.ledger.sessions

    @property
    def session_count(self) -> int:
        return len(self.ledger.sessions)

    def status(self, uid: int | None = None) -> Holdings:
        """What luod holds in all, or (`uid`) for one owner."""
        return self.ledger.holdings(uid)

    def note_subscriber(self, name: str, uid: int) -> None:
        self.ledger.note_subscriber(name, uid)

    # --- reclaim ---------------------------------------------------------------

    def start(self) -> ReclaimReport:
        """Take over what the previous kernel carried, if anything; after a
        restart in the same boot, hold again what takes whose reply had not
        gone out took (the previous luod died first)."""
        report = self._reclaimer.start()
        by = f"luod (pid {os.getpid()}, restarted)"
        for take, s in list(self.ledger.taking.items()):
            if s.kind is SessionKind.MANAGED:
                files = [(f.name, f.fd) for f in s.files.values()]
                for name in self._hold_again(take, files, RESTARTED, by):
                    report.lose(s.owner.uid, f"{s.name}/{name}")
            elif not self._hold_session_again(take, s.fd, RESTARTED, by):
                report.lose(s.owner.uid, s.name)
        return report

    def preserve_again(self, key: SessionKey | None = None) -> bool:
        """Preserve one session that came over the kexec again (`key`, or
        the next one waiting); True while more are waiting."""
        return self._reclaimer.preserve_again(key)

    def preserve_all_again(self) -> None:
        self._reclaimer.preserve_all_again()

    # --- access ----------------------------------------------------------------

    @staticmethod
    def scope(peer: Peer, owner: int | None, session: str = "") -> int:
        """The uid whose sessions a call addresses: the caller's own, or
        another's when root says so (`owner`). Refused before any lookup,
        so the refusal says nothing about what that uid holds."""
        if owner is None or owner == peer.uid:
            return peer.uid
        if not peer.is_root:
            raise errors.PermissionDenied(session, f"uid {owner}")
        return owner

    def _lookup(self, peer: Peer, name: str, owner: int | None = None) -> Session:
        """The session `name` of the caller, or of `owner` (root only)."""
        s = self.ledger.sessions.get((self.scope(peer, owner, name), name))
        if s is None:
            raise errors.NoSuchSession(name)
        return s

    def use_session(
        self, peer: Peer, name: str, preserve_again: bool = True, owner: int | None = None
    ) -> Session:
        """The session `name` of the caller (or of `owner`, root only);
        preserved again first unless the caller only reads (a copy of a
        file needs no session preserved again). Using a session claims it."""
        s = self._lookup(peer, name, owner)
        if preserve_again and s.key in self.ledger.awaiting_preservation:
            self.preserve_again(s.key)
        if s.claim_deadline is not None:
            s.claim_deadline = None
            # Committed at once: a copy commits nothing else, and a luod
            # restarted with the deadline still in the manifest would
            # release the claimed session when the grace period ends.
            self.ledger.commit(s)
            log.info(
                "session-claimed",
                session=s.name,
                owner=s.owner.describe(),
                by=peer.describe(),
                **_acting_for(peer, s),
            )
        return s

    # --- client operations -----------------------------------------------------

    def _new_session(
        self, peer: Peer, name: str, kind: SessionKind, commit: bool = True
    ) -> Session:
        """A new outgoing kernel session, named for luod, owned by `peer`.
        `commit`: write the manifest naming it (a hand-off that creates its
        session commits both in one)."""
        ledger = self.ledger
        ledger.require_usable()
        check_session_name(name)
        if (peer.uid, name) in ledger.sessions:
            raise errors.SessionExists(name)
        self.quotas.check(peer.uid, ledger, sessions=1)
        kernel_name = ledger.new_kernel_name(peer.uid, name)
        try:
            sfd = ledger.backend.create_session(kernel_name)
        except LuoError as e:
            raise errors.kernel_refused("create_session", e.errno, e.message, name) from None
        reached("create.kernel")
        s = Session(
            name=name,
            kind=kind,
            owner=owner_of(peer),
            kernel_name=kernel_name,
            created_at=ledger.clock(),
            fd=sfd,
            kexec_count=ledger.kexec_count,
        )
        ledger.add(s)
        ledger.carrier.session_held(kernel_name, sfd)
        reached("create.held")
        if commit:
            ledger.commit()
        log.info(
            "session-created",
            session=name,
            kind=kind.value,
            kernel_name=kernel_name,
            owner=s.owner.describe(),
        )
        return s

    def create_session(self, peer: Peer, name: str, commit: bool = True) -> Session:
        return self._new_session(peer, name, SessionKind.MANAGED, commit)

    def preserve_fds(
        self, peer: Peer, session: str, files: Sequence[Handoff], create: bool = False
    ) -> list[HeldFile]:
        """Hand off memfds into the caller's managed session. All or nothing
        (luod.handoff)."""
        return handoff.preserve_fds(self, peer, session, files, create)

    def adopt_session(self, peer: Peer, fd: int, parameter: str = "fileDescriptor") -> Session:
        """Hold a session fd the client created itself in this boot, as it is."""
        ledger = self.ledger
        try:
            ledger.require_usable()
            name = ledger.backend.identify_session(fd)
            if name is None:
                facts = fdinfo.inspect_fd(fd)
                raise errors.UnsupportedFd(
                    parameter, facts.kind.value, f"not a LUO session: {facts.describe()}"
                )
            # Held as it is, a session is carried only if it is outgoing:
            # the kernel drops an incoming one at the kexec, whoever holds it.
            try:
                incoming = is_incoming_session(ledger.backend, fd)
            except LuoError as e:
                raise errors.kernel_refused("preserve_fd", e.errno, e.message, name) from None
            if incoming:
                raise errors.UnsupportedFd(
                    parameter,
                    "incoming-luo-session",
                    f"session '{name}' came over the last kexec; the kernel carries only "
                    "sessions created in this boot, so it would be lost at the next one. "
                    "Retrieve its files, FINISH it, and hand them to luod (PreserveFds) or "
                    "preserve them into a session created now (CreateDelegatedSession)",
                )
            check_session_name(name, "session", limit=MAX_KERNEL_SESSION_NAME)
            if (peer.uid, name) in ledger.sessions:
                raise errors.SessionExists(name)
            self.quotas.check(peer.uid, ledger, sessions=1)
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
        ledger.add(s)
        ledger.carrier.session_held(name, fd)
        reached("adopt.held")
        ledger.commit()
        log.info("session-adopted", session=name, owner=s.owner.describe())
        return s

    def create_delegated(self, peer: Peer, name: str) -> tuple[int, Session]:
        """A session for the client to preserve its own files into (device
        fds that only the owning process may touch, say). luod keeps a
        reference, so the session survives the client's restart or crash and
        the shutdown; after the kexec the owner takes it back whole."""
        s = self._new_session(peer, name, SessionKind.DELEGATED)
        what = f"session '{name}' is made, no copy of it for this reply (RetrieveSession gets one)"
        return _copy(s.fd, what), s

    def list_sessions(
        self, peer: Peer, session: str | None = None, owner: int | None = None
    ) -> list[Session]:
        """The caller's sessions; root's view (no `owner`) is everyone's.
        `session`: only those of that name (NoSuchSession if none)."""
        if owner is None and peer.is_root:
            found = [
                s for s in self.ledger.sessions.values() if session is None or s.name == session
            ]
        else:
            uid = self.scope(peer, owner, session or "")
            found = [s for s in self.ledger.owned_by(uid) if session is None or s.name == session]
        if session is not None and not found:
            raise errors.NoSuchSession(session)
        return found

    def retrieve_fd(
        self,
        peer: Peer,
        session: str,
        name: str,
        take: bool,
        owner: int | None = None,
        pending: list[int] | None = None,
    ) -> tuple[int, HeldFile]:
        """A copy of a held file (custody goes on), or the file itself
        (custody ends). `pending`: where to add the take's number, for a
        take whose reply is still to go out; the caller then settles it
        (delivered(), give_back()). Without it custody ends now."""
        s = self.use_session(peer, session, preserve_again=take, owner=owner)
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
        out = _copy(f.fd, f"no copy of '{session}/{name}' made")
        if not take:
            log.info(
                "fd-copied",
                session=s.name,
                name=f.name,
                owner=s.owner.describe(),
                to=peer.describe(),
                **_acting_for(peer, s),
            )
            return out, f
        try:
            self._take_files(s, [f], pending)
        except BaseException:
            os.close(out)
            raise
        log.info(
            "fd-taken",
            session=session,
            name=name,
            owner=s.owner.describe(),
            by=peer.describe(),
            **_acting_for(peer, s),
        )
        return out, f

    def retrieve_fds(
        self,
        peer: Peer,
        session: str,
        names: Sequence[str] | None,
        take: bool,
        owner: int | None = None,
        limit: int | None = None,
        pending: list[int] | None = None,
    ) -> list[tuple[int, HeldFile]]:
        """Copies of held files (custody goes on), or the files themselves
        (custody ends): those `names`, or every file of the session. All or
        nothing: every name is checked before an fd is handed out, and taking
        rebuilds the session once, without all of them. `limit`: at most
        that many fds (what one reply carries). `pending`: as retrieve_fd()'s."""
        s = self.use_session(peer, session, preserve_again=take, owner=owner)
        if s.kind is not SessionKind.MANAGED:
            raise errors.WrongSessionKind(
                session,
                s.kind.value,
                "luod holds the session fd, not files in it; use RetrieveSession",
            )
        if names is None:
            files = list(s.files.values())
        else:
            files = []
            seen: set[str] = set()
            for i, name in enumerate(names):
                if name in seen:
                    raise errors.InvalidName(f"names[{i}]", name, "named twice in the call")
                seen.add(name)
                f = s.files.get(name)
                if f is None:
                    raise errors.NoSuchFd(session, name)
                files.append(f)
        if limit is not None and len(files) > limit:
            raise errors.TooManyFds(session, len(files), limit)
        for f in files:
            if f.fd < 0:
                raise errors.NotReady(
                    f"luod holds no reference to '{session}/{f.name}' in this boot (luod was "
                    "restarted; the kernel cannot hand a file back out of an outgoing "
                    "session): it is carried over the next kexec and can be retrieved after it"
                )
        if take and len(files) < len(s.files) and any(x.fd < 0 for x in s.files.values()):
            raise errors.NotReady(
                f"files of '{session}' can only be copied until the next kexec: luod was "
                f"restarted and holds no reference to the other files of '{session}', "
                "which taking some would have to preserve again"
            )
        out: list[int] = []
        try:
            for f in files:
                out.append(_copy(f.fd, f"no copies of the files of '{session}' made"))
            if take and files:
                self._take_files(s, files, pending)
        except BaseException:
            for fd in out:
                os.close(fd)
            raise
        # As a hand-off logs: one file as RetrieveFd does, a batch in one
        # line with every name in it.
        who = {"by": peer.describe()} if take else {"to": peer.describe()}
        if len(files) == 1:
            log.info(
                "fd-taken" if take else "fd-copied",
                session=s.name,
                name=files[0].name,
                owner=s.owner.describe(),
                **who,
                **_acting_for(peer, s),
            )
        elif files:
            log.info(
                "fds-taken" if take else "fds-copied",
                session=s.name,
                names=",".join(f.name for f in files),
                count=len(files),
                owner=s.owner.describe(),
                **who,
                **_acting_for(peer, s),
            )
        return list(zip(out, files, strict=True))

    def _take_files(self, s: Session, taken: Sequence[HeldFile], pending: list[int] | None) -> None:
        """End custody of `taken`, files of `s` whose fds the caller has
        (dups): the session is rebuilt once without them, or let go of when
        nothing remains. Write-ahead intent, the kernel steps, the commit,
        then luod's references are released; for a take added to `pending`
        they are kept until it is settled."""
        ledger = self.ledger
        gone = {f.name for f in taken}
        remaining = [x for x in s.files.values() if x.name not in gone]
        old = s.kernel_name
        try:
            if remaining:
                # The session is rebuilt without the files: a luod restarted
                # before the commit rebuilds it from the manifest instead.
                ledger.intend(s)
                reached("take.intent")
                old = ledger.represerve(s, remaining, "take.dropped", "take.represerved")
        except LuoError as e:
            raise errors.kernel_refused("preserve_fd", e.errno, e.message, s.name) from None
        for f in taken:
            ledger.unindex(f)
            del s.files[f.name]
        if pending is not None:
            # Recorded with the commit below, until its reply has gone out;
            # luod's references to the files taken are kept till then, apart
            # from the session's: a luod restarted before holds them again.
            part = _taken_part(s, taken, TAKEN_REFS_PREFIX + old)
            ledger.keep(part, taken)
            pending.append(ledger.record_take(part))
        if remaining:
            ledger.commit(s)
            reached("take.committed")
            # The old references, the taken files' among them.
            ledger.release_kept(old)
        else:
            ledger.drop(s, "its last fd was taken")
        for f in taken:
            f.close()

    def delivered(self, take: int) -> None:
        """The reply of `take` went out: custody of what it took ends (its
        record and luod's references go). Never raises: the transport calls
        it as the reply is sent."""
        ledger = self.ledger
        s = ledger.end_take(take)
        if s is None:
            return
        try:
            reached("take.delivered")
            # Every carrier: the state session's manifest is what the next
            # boot reads, and it would say the take's files were lost.
            ledger.commit()
            self._let_go_taken(s)
        except Exception as e:  # outside any call: logged, never raised
            _not_settled(s, e)

    def _let_go_taken(self, s: Session) -> None:
        """Release what was kept for the take `s` (its record gone)."""
        if s.kind is SessionKind.MANAGED:
            self.ledger.release_kept(s.kernel_name)
        else:
            self.ledger.carrier.session_dropped(s.kernel_name)

    def give_back(self, peer: Peer, take: int, fds: Sequence[int]) -> None:
        """Hold again what `take` (RetrieveFd, RetrieveFds with take) took:
        its reply never reached `peer` (the connection went before luod
        could send it), so custody did not end after all. `fds`: the
        reply's, one per file taken, in order, luod's now (-1: closed
        already, lost). Never raises (it runs once the reply is known to
        be lost, outside any call)."""
        s = self.ledger.taking.get(take)
        if s is None:  # settled already
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
            return
        self._hold_again(take, list(zip(s.files, fds, strict=True)), NOT_DELIVERED, peer.describe())

    def _hold_again(self, take: int, files: list[tuple[str, int]], why: str, by: str) -> list[str]:
        """The files of `take` ((name, fd) each, the fds luod's, -1 where
        none is left) back into their owner's session under their names, as
        a hand-off of the owner (the session made again if taking them let
        go of it): write-ahead, all or nothing, within the owner's quotas,
        committed together with the end of the take's record. What cannot
        be held again is logged as lost, with the reason, and returned (its
        names). Never raises."""
        ledger = self.ledger
        s = ledger.taking[take]
        # A reply's fds are closed together: all of them or none.
        lost = [name for name, fd in files if fd < 0]
        back = [Handoff(name, fd) for name, fd in files if fd >= 0]
        if back and (failed := self._hand_back(take, s, back)) is not None:
            lost += [h.name for h in back]
            back = []
            why = f"{why}; they could not be held again: {failed}"
        try:
            # Ended already if the files went back: the hand-off committed it.
            ledger.end_take(take)
            if not back:
                # Nothing committed the end of the take's record.
                ledger.commit()
            self._let_go_taken(s)
        except Exception as e:  # outside any call: logged, never raised
            _not_settled(s, e)
        if back:
            names = ",".join(h.name for h in back)
            _given_back("fds-given-back", s.name, s.owner, by, why, names=names)
        if lost:
            _given_back("fds-lost", s.name, s.owner, by, why, names=",".join(lost))
        return lost

    def _hand_back(self, take: int, s: Session, back: list[Handoff]) -> str | None:
        """Hand `back` off into the session of the take `s` as its owner,
        the take's record ending with the hand-off's commit: None, or why
        they could not be held again (their fds closed then)."""
        ledger = self.ledger
        try:
            try:
                # Sessions that came over the kexec are preserved again
                # before a hand-off, each committed: with the take still
                # recorded, so that a luod killed before the hand-off's own
                # commit holds the files again.
                self.preserve_all_again()
                if ledger.carrier.holds_after_exit:
                    # The files stay preserved in the session they were
                    # taken from until whoever holds a copy of it lets go
                    # (EBUSY).
                    ledger.carrier.settle(REPRESERVE_PATIENCE)
            except BaseException:
                for h in back:
                    os.close(h.fd)
                raise
            ledger.end_take(take)
            as_owner = Peer(os.getpid(), s.owner.uid, 0, s.owner.unit, s.owner.comm)
            handoff.preserve_fds(self, as_owner, s.name, back, create=True)
        except Exception as e:  # outside any call: logged, never raised
            return str(e) if isinstance(e, errors.LuodError) else repr(e)
        return None

    def give_back_session(self, peer: Peer, take: int, fd: int) -> None:
        """Hold again the session that came over the kexec and that `take`
        (RetrieveSession) took, its reply never having reached `peer`:
        as it was before the call, claimed. `fd`: luod's (-1: closed
        already, lost). Within the owner's quotas, as adopting it would be."""
        self._hold_session_again(take, fd, NOT_DELIVERED, peer.describe())

    def _hold_session_again(self, take: int, fd: int, why: str, by: str) -> bool:
        """The session of `take` held again, as it was before the call,
        claimed; False (logged) when it is lost. Never raises."""
        ledger = self.ledger
        seen = ledger.end_take(take)
        if seen is None:  # settled already
            if fd >= 0:
                os.close(fd)
            return True
        event = "session-lost"
        if fd >= 0:
            try:
                if seen.key in ledger.sessions:
                    raise errors.SessionExists(seen.name)
                # While the reply waited the session counted no more: the
                # owner may have taken its place.
                self.quotas.check(seen.owner.uid, ledger, sessions=1)
            except errors.LuodError as e:
                os.close(fd)
                why = f"{why}; it could not be held again: {e}"
            else:
                # As adopt_session holds a session.
                s = dataclasses.replace(seen, claim_deadline=None, fd=fd)
                ledger.add(s)
                ledger.carrier.session_held(s.kernel_name, fd)
                event = "session-given-back"
        try:
            ledger.commit()
            if event == "session-lost":
                self._let_go_taken(seen)
        except Exception as e:  # outside any call: logged, never raised
            _not_settled(seen, e)
        _given_back(event, seen.name, seen.owner, by, why, kernel_name=seen.kernel_name)
        return event != "session-lost"

    def retrieve_session(
        self,
        peer: Peer,
        session: str,
        owner: int | None = None,
        pending: list[int] | None = None,
    ) -> tuple[int, Session]:
        """An adopted or delegated session's fd for its owner, and the
        session as the owner found it (before this call claimed it). Before
        the kexec a copy: luod must go on holding it for it to be carried (a
        client that restarted gets its session back this way). After the
        kexec the session itself: custody ends. `pending`: as
        retrieve_fd()'s; until the take is settled the carrier keeps its
        copy of the session."""
        ledger = self.ledger
        found = ledger.sessions.get((self.scope(peer, owner, session), session))
        deadline = None if found is None else found.claim_deadline
        s = self.use_session(peer, session, owner=owner)
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
                "session-copied",
                session=session,
                owner=s.owner.describe(),
                to=peer.describe(),
                **_acting_for(peer, s),
            )
            return _copy(s.fd, f"no copy of session '{session}' made"), seen
        fd, s.fd = s.fd, -1
        ledger.remove(s.key)
        if pending is not None:
            pending.append(ledger.record_take(dataclasses.replace(seen, fd=-1)))
        ledger.commit()
        reached("release.committed")
        if pending is None:
            ledger.carrier.session_dropped(s.kernel_name)
        log.info(
            "session-returned",
            session=session,
            state=s.state.value,
            owner=s.owner.describe(),
            to=peer.describe(),
            **_acting_for(peer, s),
        )
        return fd, seen

    def discard_session(self, peer: Peer, session: str, owner: int | None = None) -> Session:
        # Nothing to preserve again in what is let go of (drop closes it as
        # it is).
        s = self.use_session(peer, session, preserve_again=False, owner=owner)
        acting = f" for uid {s.owner.uid}" if s.owner.uid != peer.uid else ""
        self.ledger.drop(s, f"discarded by {peer.describe()}{acting}")
        return s

    # --- the grace period after a kexec ----------------------------------------

    def next_deadline(self, uid: int | None = None) -> float | None:
        """When the next unclaimed session (of `uid`'s) is to be released, if any is."""
        return self._reclaimer.next_deadline(uid)

    def expire(self) -> list[str]:
        """Release what nobody claimed within the grace period."""
        return self._reclaimer.expire()

    # --- preflight and shutdown ------------------------------------------------

    def check(self, uid: int | None = None) -> list[Problem]:
        """What would be lost if the kexec happened now, and why: all of it,
        or (`uid`) what concerns that owner's sessions or every session."""
        self.preserve_all_again()
        problems = preflight_check(self.ledger)
        if uid is None:
            return problems
        return [p for p in problems if p.uid is None or p.uid == uid]

    def close(self) -> None:
        """luod is stopping without a kexec (tests, fallback): close all."""
        self.ledger.close()


# What luod's references to the files of a take waiting are kept under
# (Carrier.keep_files): the kernel session's name they were taken from
# after it. No kernel session's name begins so (luod.names).
TAKEN_REFS_PREFIX = "taken."

# Why a take is undone (Custodian.give_back, give_back_session, start).
NOT_DELIVERED = "the reply that carried it was not delivered: the connection closed first"
RESTARTED = (
    "luod died before the reply that carried it went out (or before it recorded that it had)"
)


def _not_settled(s: Session, e: Exception) -> None:
    log.error(
        "take-not-settled",
        session=s.name,
        owner=s.owner.describe(),
        reason=repr(e),
        hint="a luod restarted in this boot holds what it took again",
    )


def _given_back(event: str, session: str, owner: Owner, by: str, why: str, **fields: str) -> None:
    """Log what a take not delivered left held (a warning: the client did
    not get what it asked for) or lost (an error)."""
    lost = event.endswith("-lost")
    said = {**fields, "owner": owner.describe(), "by": by, "reason": why}
    if not lost:
        said["hint"] = (
            "held as before the call; ask again and read the reply"
            if why.startswith(NOT_DELIVERED)
            else "held as before the call, whether or not its client got the reply; "
            "take it again, or discard it if the client has it"
        )
    (log.error if lost else log.warning)(event, session=session, **said)


def _taken_part(s: Session, taken: Sequence[HeldFile], kernel_name: str) -> Session:
    """What a take of the files `taken` of `s` took, as the manifest records
    it until its reply went out: `s` with those files only, under the name
    luod keeps its references to them under."""
    files = {
        f.name: HeldFile(f.name, f.token, f.size, f.preserved_at, manifest_entry=f.manifest_entry)
        for f in taken
    }
    return dataclasses.replace(s, kernel_name=kernel_name, fd=-1, files=HeldFiles(files))


def _copy(fd: int, what: str) -> int:
    """A copy of a held fd for a reply. With a full fd table NotReady, that
    says `what` (no OSError: InternalServerError would tell nothing)."""
    try:
        return os.dup(fd)
    except OSError as e:
        if e.errno in errors.FD_TABLE_FULL:
            raise errors.fd_table_full(e.errno, what) from None
        raise


def _acting_for(peer: Peer, s: Session) -> dict[str, int]:
    """The log field that says root acted on another uid's session."""
    return {"for": s.owner.uid} if s.owner.uid != peer.uid else {}
