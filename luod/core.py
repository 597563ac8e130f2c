"""luod's core: custody of sessions and fds, ownership, reclaim, grace.

No varlink here. Every method that receives an fd takes ownership of it: it
is either kept (in a Session) or closed before the method returns, also on
error. Every method that returns an fd hands ownership to the caller.

Custody works across any number of kexecs: the kernel only carries sessions
created in the current boot, so at reclaim luod retrieves every file of a
managed session and preserves it again into a fresh outgoing session.

A carrier that holds sessions across luod's exit (the fd store) also hands
them back to a luod restarted in the same boot, as they were: outgoing, and
without luod's own references to the files in them (see _restore).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import structlog

from luod import errors
from luod.carrier import Carrier
from luod.kernel import fdinfo
from luod.kernel.backend import Backend, LuoError
from luod.manifest import Manifest, ManifestError, from_json, to_json
from luod.model import HeldFile, Owner, Session, SessionKind, SessionState
from luod.peer import Peer

log = structlog.get_logger("luod")

MAX_SESSION_NAME = 48
# How long to wait for the carrier to let go of a dropped session's fd.
REPRESERVE_PATIENCE = 3.0
MAX_FD_NAME = 255
# Session names luod will not create or adopt: PID 1 owns 'systemd' (its fd
# store carrier), luod owns everything starting with 'luod'.
RESERVED_EXACT = frozenset({"systemd"})
RESERVED_PREFIX = "luod"
_SESSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:+=-]*$")
# A valid systemd fd name (no ':' which separates LISTEN_FDNAMES), so a name
# can be handed on to a service's fd store unchanged.
_FD_NAME = re.compile(r"^[A-Za-z0-9_.@+=,-]+$")


def check_session_name(
    name: str, parameter: str = "session", limit: int = MAX_SESSION_NAME
) -> None:
    if not name:
        raise errors.InvalidName(parameter, name, "must not be empty")
    if len(name.encode()) > limit:
        raise errors.InvalidName(parameter, name, f"longer than {limit} bytes")
    if not _SESSION_NAME.match(name):
        raise errors.InvalidName(
            parameter,
            name,
            "must start with a letter or digit and use only letters, digits and _.@:+=-",
        )
    if name in RESERVED_EXACT:
        raise errors.ReservedSessionName(
            name, "PID 1 uses it for the fd stores it carries over kexec"
        )
    if name.startswith(RESERVED_PREFIX):
        raise errors.ReservedSessionName(name, "names starting with 'luod' are luod's own")


def check_fd_name(name: str, parameter: str = "name") -> None:
    if len(name) <= MAX_FD_NAME and _FD_NAME.match(name):
        return  # the common case first: a hand-off checks every name
    if not name:
        raise errors.InvalidName(parameter, name, "must not be empty")
    if len(name) > MAX_FD_NAME:
        raise errors.InvalidName(parameter, name, f"longer than {MAX_FD_NAME} characters")
    if not _FD_NAME.match(name):
        raise errors.InvalidName(
            parameter, name, "must use only letters, digits and _.@+=,- (a valid fd name)"
        )


def owner_of(peer: Peer) -> Owner:
    return Owner(uid=peer.uid, unit=peer.unit, comm=peer.comm)


@dataclasses.dataclass
class Incoming:
    """A file offered for hand-off: its name, fd (owned), and where it came from."""

    name: str
    fd: int
    # Where in the call it came from, e.g. "files[2]"; "" for top-level parameters.
    where: str = ""

    def parameter(self, field: str) -> str:
        return f"{self.where}.{field}" if self.where else field


@dataclasses.dataclass
class ReclaimReport:
    # "fresh" (nothing came over), "reclaimed" (after a kexec), "restored"
    # (luod restarted in the same boot), "failed"
    state: str
    sessions: int = 0
    files: int = 0
    lost: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None
    # Until every file that came over could be retrieved.
    duration: float = 0.0
    # After a kexec, managed sessions are preserved again (FINISH, then a new
    # outgoing session) once luod is ready, session by session: how long that
    # took, None while sessions are still waiting for it.
    preserved_again: float | None = 0.0


@dataclasses.dataclass
class Problem:
    session: str
    name: str | None
    reason: str


class Custodian:
    def __init__(
        self,
        backend: Backend,
        carrier: Carrier,
        grace: float = 600.0,
        clock: Callable[[], float] = time.time,
        boot_id: str = "",
    ) -> None:
        self.backend = backend
        # Written into the manifest: a manifest of this very boot means luod
        # was restarted, not kexeced. "" (unknown) never matches.
        self.boot_id = boot_id
        # Subscribers of this boot, and of the boot before the last kexec.
        self.known_subscribers: dict[str, int] = {}
        self.previous_subscribers: dict[str, int] = {}
        self.carrier = carrier
        self.grace = grace
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self.kexec_count = 0
        self.name_counter = 0
        self.reclaim: ReclaimReport | None = None
        self.manifest_error: ManifestError | None = None
        self._by_inode: dict[tuple[int, int], tuple[str, str]] = {}
        # Managed sessions that came over the kexec: every file is retrieved
        # and held (copies can be handed out), but the session is still the
        # incoming one, to be finished and preserved again (settle()).
        self.unsettled: dict[str, int] = {}  # name -> incoming session fd
        self._settle_started = 0.0
        self.started_at = clock()

    # --- start, reclaim and the manifest ---------------------------------

    def start(self) -> ReclaimReport:
        """Take over what the previous kernel carried, if anything."""
        t0 = time.monotonic()
        try:
            incoming = self.carrier.load()
        except ManifestError as e:
            self.manifest_error = e
            self.reclaim = ReclaimReport("failed", error=e.message, duration=time.monotonic() - t0)
            log.error("manifest-unusable", kind=e.kind, reason=e.message, released="nothing")
            return self.reclaim
        if incoming is None:
            self.reclaim = ReclaimReport("fresh", duration=time.monotonic() - t0)
            self.carrier.finish_incoming()
            self._save()
            log.info("started-fresh", backend=self.backend.name, carrier=self.carrier.name)
            return self.reclaim
        try:
            manifest = from_json(incoming.payload)
        except ManifestError as e:
            self.manifest_error = e
            self.reclaim = ReclaimReport("failed", error=e.message, duration=time.monotonic() - t0)
            log.error(
                "manifest-unusable",
                kind=e.kind,
                reason=e.message,
                source=incoming.source,
                released="nothing",
            )
            return self.reclaim
        if self.boot_id and manifest.boot_id == self.boot_id:
            report = self._restore(manifest)
        else:
            report = self._reclaim(manifest)
        report.duration = time.monotonic() - t0
        self.reclaim = report
        log.info(
            report.state,
            sessions=report.sessions,
            files=report.files,
            lost=len(report.lost),
            kexec_count=self.kexec_count,
            seconds=round(report.duration, 4),
        )
        return report

    def _reclaim(self, manifest: Manifest) -> ReclaimReport:
        self.kexec_count = manifest.kexec_count + 1
        self.name_counter = manifest.name_counter
        self.previous_subscribers = dict(manifest.subscribers)
        report = ReclaimReport("reclaimed")
        deadline = self.clock() + self.grace
        for old in manifest.sessions:
            sfd = self._retrieve_or_report(old, report)
            if sfd < 0:
                continue
            old.state = SessionState.INCOMING
            old.claim_deadline = deadline
            old.kexec_count = self.kexec_count
            self.sessions[old.name] = old
            report.sessions += 1
            if old.kind is SessionKind.MANAGED:
                # Only what makes the files retrievable happens before luod
                # is ready; settle() carries custody on afterwards.
                self._retrieve_files(old, sfd, report)
                self.unsettled[old.name] = sfd
            else:
                old.fd = sfd
                log.info(
                    "session-arrived",
                    session=old.name,
                    kind=old.kind.value,
                    owner=old.owner.describe(),
                )
        if self.unsettled:
            report.preserved_again = None
        else:
            self._settled(report)
        return report

    def _retrieve_or_report(self, s: Session, report: ReclaimReport) -> int:
        """The carrier's fd for a session named in the manifest, or -1 with
        the loss recorded in `report` and logged."""
        try:
            return self.carrier.retrieve_session(s.kernel_name)
        except LuoError as e:
            report.lost.append(s.name)
            log.error(
                "session-lost",
                session=s.name,
                kernel_name=s.kernel_name,
                owner=s.owner.describe(),
                reason=str(e),
            )
            return -1

    def _restore(self, manifest: Manifest) -> ReclaimReport:
        """luod was restarted in this boot: the carrier kept every session
        fd, so the sessions are taken back as they were, outgoing (or still
        incoming if unclaimed since the last kexec). The kernel cannot hand
        a file back out of an outgoing session, so luod holds no reference
        to the files of managed sessions (fd -1) until the next kexec: no
        copies until then, and check() does not count that as a problem."""
        self.kexec_count = manifest.kexec_count
        self.name_counter = manifest.name_counter
        self.known_subscribers = dict(manifest.subscribers)
        report = ReclaimReport("restored")
        for s in manifest.sessions:
            fd = self._retrieve_or_report(s, report)
            if fd < 0:
                continue
            s.kexec_count = self.kexec_count
            self.sessions[s.name] = s
            report.sessions += 1
            if s.kind is SessionKind.MANAGED and s.state is SessionState.INCOMING:
                # The previous luod died before it preserved this session
                # again (settle()): it is still the incoming session, not
                # finished, and the kernel hands its files out again.
                self._retrieve_files(s, fd, report)
                self.unsettled[s.name] = fd
            else:
                s.fd = fd
                report.files += len(s.files)
            log.info(
                "session-restored",
                session=s.name,
                kind=s.kind.value,
                state=s.state.value,
                owner=s.owner.describe(),
                files=len(s.files),
            )
        if self.unsettled:
            report.preserved_again = None
        self.carrier.finish_incoming()
        self._save()
        return report

    def _retrieve_files(self, s: Session, incoming_fd: int, report: ReclaimReport) -> None:
        """Retrieve every file of an incoming managed session; a file the
        kernel cannot give back is recorded as lost."""
        for f in list(s.files.values()):
            try:
                f.fd = self.backend.retrieve_fd(incoming_fd, f.token)
            except LuoError as e:
                log.error(
                    "fd-lost",
                    session=s.name,
                    name=f.name,
                    token=f.token,
                    owner=s.owner.describe(),
                    reason=str(e),
                )
                del s.files[f.name]
                report.lost.append(f"{s.name}/{f.name}")
                continue
            report.files += 1

    def settle(self, name: str | None = None) -> bool:
        """Carry custody on for one session that came over the kexec (`name`,
        or the next one waiting): FINISH its incoming session and preserve
        its files again into a new outgoing one. A retrieved file counts as
        preserved until its incoming session is finished, so FINISH comes
        first. True while more sessions are waiting."""
        if name is None:
            name = next(iter(self.unsettled), None)
        if name is None or name not in self.unsettled:
            return bool(self.unsettled)
        if not self._settle_started:
            self._settle_started = time.monotonic()
        s = self.sessions[name]
        incoming_fd = self.unsettled.pop(name)
        incoming_name = s.kernel_name
        try:
            self.backend.finish_session(incoming_fd)
        except LuoError as e:
            log.error("finish-failed", session=s.name, owner=s.owner.describe(), reason=str(e))
        finally:
            os.close(incoming_fd)
        for f in s.files.values():
            self._index(s, f)
        try:
            self._represerve(s, s.files.values())
        except LuoError as e:
            # The files are held and usable in this boot; check() reports
            # that they would not survive the next kexec.
            log.error("represerve-failed", session=s.name, owner=s.owner.describe(), reason=str(e))
        if self.carrier.holds_after_exit:
            # A luod restarted from now on must find the new session by its
            # name: the manifest says it before the carrier lets go of the
            # incoming one (finished, it has nothing left to give).
            self._save()
        self.carrier.session_dropped(incoming_name)
        log.info(
            "session-arrived",
            session=s.name,
            kind=s.kind.value,
            owner=s.owner.describe(),
            files=len(s.files),
        )
        if not self.unsettled and self.reclaim is not None:
            self._settled(self.reclaim)
        return bool(self.unsettled)

    def settle_all(self) -> None:
        while self.settle():
            pass

    def _settled(self, report: ReclaimReport) -> None:
        """Every session that came over is held as it will be carried: the
        previous boot's state is finished with and the manifest written."""
        self.carrier.finish_incoming()
        self._save()
        if self._settle_started:
            report.preserved_again = time.monotonic() - self._settle_started
            log.info(
                "custody-resumed",
                sessions=report.sessions,
                files=report.files,
                seconds=round(report.preserved_again, 4),
            )

    def _new_kernel_name(self, name: str) -> str:
        self.name_counter += 1
        return f"{RESERVED_PREFIX}.{self.name_counter}.{name}"[:63]

    def _represerve(self, s: Session, files: Iterable[HeldFile]) -> None:
        """Put `files` (fds luod holds) into a brand-new outgoing session for
        `s`. The kernel has no 'unpreserve one file' and keeps a file in one
        session at a time (EBUSY), so the old session goes first: closing its
        last fd unpreserves everything in it. If the new one cannot be made,
        luod still holds the files but the session is not carried: check()
        says so and the preflight refuses the kexec."""
        old_fd, old_kernel = s.fd, s.kernel_name
        s.fd = -1
        if old_fd >= 0:
            os.close(old_fd)
            self.carrier.session_dropped(old_kernel)
        kernel_name = self._new_kernel_name(s.name)
        sfd = self.backend.create_session(kernel_name)
        # A carrier that holds copies of the old session fd (PID 1's fd
        # store) lets go of them asynchronously: until it has, the files are
        # still preserved in the old session and preserving them is EBUSY.
        patience = REPRESERVE_PATIENCE if old_fd >= 0 and self.carrier.holds_after_exit else 0.0
        try:
            for f in files:
                self._preserve_patiently(sfd, f, patience, s.name)
        except BaseException:
            os.close(sfd)
            raise
        s.fd, s.kernel_name, s.state = sfd, kernel_name, SessionState.OUTGOING
        self.carrier.session_held(kernel_name, sfd)

    def _preserve_patiently(self, sfd: int, f: HeldFile, patience: float, session: str) -> None:
        deadline = time.monotonic() + patience
        delay = 0.005
        while True:
            try:
                self.backend.preserve_fd(sfd, f.fd, f.token)
                return
            except LuoError as e:
                if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                    raise
                log.debug(
                    "represerve-waits",
                    session=session,
                    name=f.name,
                    reason="old session still held",
                )
                time.sleep(delay)
                delay = min(delay * 2, 0.1)

    def _manifest(self) -> Manifest:
        return Manifest(
            sessions=list(self.sessions.values()),
            kexec_count=self.kexec_count,
            name_counter=self.name_counter,
            written_at=self.clock(),
            boot_id=self.boot_id,
            subscribers=self.known_subscribers,
        )

    def note_subscriber(self, name: str, uid: int) -> None:
        """Remember who subscribed in this boot, so that after the kexec
        they are told what came with them ("resumed")."""
        if self.known_subscribers.get(name) != uid:
            self.known_subscribers[name] = uid
            self._save()

    def _save(self) -> None:
        if self.manifest_error is not None:
            # Writing would shadow the incoming state the operator must see.
            return
        self.carrier.save(to_json(self._manifest()))

    # --- access -------------------------------------------------------------

    def _session(self, peer: Peer, name: str, settle: bool = True) -> Session:
        """The session `name` if `peer` may use it; settled first unless the
        caller only reads (a copy of a file needs no settled session)."""
        s = self.sessions.get(name)
        if s is None:
            raise errors.NoSuchSession(name)
        if not peer.is_root and peer.uid != s.owner.uid:
            raise errors.PermissionDenied(name, s.owner.describe())
        if settle and name in self.unsettled:
            self.settle(name)
        if s.claim_deadline is not None:
            s.claim_deadline = None
            log.info(
                "session-claimed", session=s.name, owner=s.owner.describe(), by=peer.describe()
            )
        return s

    def _require_usable(self) -> None:
        if self.manifest_error is not None:
            raise errors.NotReady(
                f"the incoming manifest is unusable ({self.manifest_error.message}); "
                "luod releases nothing and accepts no new custody until an operator resolves it"
            )

    def _index(self, s: Session, f: HeldFile) -> None:
        st = os.fstat(f.fd)
        self._by_inode[(st.st_dev, st.st_ino)] = (s.name, f.name)

    def _unindex(self, f: HeldFile) -> None:
        if f.fd >= 0:
            st = os.fstat(f.fd)
            self._by_inode.pop((st.st_dev, st.st_ino), None)

    # --- client operations --------------------------------------------------

    def _new_session(self, peer: Peer, name: str, kind: SessionKind) -> Session:
        """A new outgoing kernel session, named for luod, owned by `peer`."""
        self._require_usable()
        check_session_name(name)
        if name in self.sessions:
            raise errors.SessionExists(name)
        kernel_name = self._new_kernel_name(name)
        try:
            sfd = self.backend.create_session(kernel_name)
        except LuoError as e:
            raise errors.KernelRefused("create_session", e.errno, e.message, name) from None
        s = Session(
            name=name,
            kind=kind,
            owner=owner_of(peer),
            kernel_name=kernel_name,
            created_at=self.clock(),
            fd=sfd,
            kexec_count=self.kexec_count,
        )
        self.sessions[name] = s
        self.carrier.session_held(kernel_name, sfd)
        self._save()
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
        self, peer: Peer, session: str, files: Sequence[Incoming], create: bool = False
    ) -> list[HeldFile]:
        """Hand off memfds into a managed session. All or nothing."""
        try:
            return self._preserve_fds(peer, session, files, create)
        finally:
            for inc in files:
                if inc.fd >= 0:
                    os.close(inc.fd)

    def _preserve_fds(
        self, peer: Peer, session: str, files: Sequence[Incoming], create: bool
    ) -> list[HeldFile]:
        self._require_usable()
        # Files that came over the kexec are indexed (AlreadyPreserved) when
        # their session is settled.
        self.settle_all()
        created = False
        if create and session not in self.sessions:
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
        for inc in files:
            check_fd_name(inc.name, inc.parameter("name"))
            if inc.name in names or (
                session in self.sessions and inc.name in self.sessions[session].files
            ):
                raise errors.FdNameExists(session, inc.name)
            names.add(inc.name)
            facts = fdinfo.inspect_fd(inc.fd)
            if facts.kind is not fdinfo.FdKind.MEMFD:
                raise errors.UnsupportedFd(
                    inc.parameter("fileDescriptor"), facts.kind.value, _refusal(facts)
                )
            held = self._by_inode.get((facts.dev, facts.ino))
            if held is not None:
                raise errors.AlreadyPreserved(inc.parameter("fileDescriptor"), held[0], held[1])
            checked.append(facts)
        if session not in self.sessions:
            self.create_session(peer, session)
            created = True
        s = self.sessions[session]
        now = self.clock()
        added: list[HeldFile] = []
        try:
            for inc, facts in zip(files, checked, strict=True):
                f = HeldFile(
                    name=inc.name,
                    token=s.next_token(),
                    size=facts.size,
                    preserved_at=now,
                    fd=inc.fd,
                )
                self.backend.preserve_fd(s.fd, f.fd, f.token)
                inc.fd = -1  # owned by the session from here on
                added.append(f)
                s.files[f.name] = f
                self._by_inode[(facts.dev, facts.ino)] = (s.name, f.name)
        except LuoError as e:
            self._rollback(s, added, created)
            raise errors.KernelRefused("preserve_fd", e.errno, e.message, session) from None
        self._save()
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
        for f in added:
            self._unindex(f)
            del s.files[f.name]
            f.close()
        if created:
            self._drop(s, "hand-off failed")
        elif added:
            self._represerve(s, s.files.values())
        self._save()

    def adopt_session(self, peer: Peer, fd: int, parameter: str = "fileDescriptor") -> Session:
        """Hold a session fd the client created itself, as it is."""
        try:
            self._require_usable()
            name = self.backend.identify_session(fd)
            if name is None:
                facts = fdinfo.inspect_fd(fd)
                raise errors.UnsupportedFd(
                    parameter, facts.kind.value, f"not a LUO session: {facts.describe()}"
                )
            check_session_name(name, "session", limit=63)
            if name in self.sessions:
                raise errors.SessionExists(name)
        except BaseException:
            os.close(fd)
            raise
        s = Session(
            name=name,
            kind=SessionKind.ADOPTED,
            owner=owner_of(peer),
            kernel_name=name,
            created_at=self.clock(),
            fd=fd,
            kexec_count=self.kexec_count,
        )
        self.sessions[name] = s
        self.carrier.session_held(name, fd)
        self._save()
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
            s = self.sessions.get(session)
            if s is None:
                raise errors.NoSuchSession(session)
            if not peer.is_root and peer.uid != s.owner.uid:
                raise errors.PermissionDenied(session, s.owner.describe())
            return [s]
        return [s for s in self.sessions.values() if peer.is_root or s.owner.uid == peer.uid]

    def retrieve_fd(self, peer: Peer, session: str, name: str, take: bool) -> tuple[int, HeldFile]:
        """A copy of a held file (custody goes on), or the file itself (custody ends)."""
        s = self._session(peer, session, settle=take)
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
                self._represerve(s, remaining)
        except LuoError as e:
            os.close(out)
            raise errors.KernelRefused("preserve_fd", e.errno, e.message, session) from None
        self._unindex(f)
        del s.files[name]
        f.close()
        if not remaining:
            self._drop(s, "its last fd was taken")
        self._save()
        log.info(
            "fd-taken", session=session, name=name, owner=s.owner.describe(), by=peer.describe()
        )
        return out, f

    def retrieve_session(self, peer: Peer, session: str) -> int:
        """An adopted or delegated session's fd for its owner. Before the
        kexec a copy: luod must go on holding it for it to be carried (a
        client that restarted gets its session back this way). After the
        kexec the session itself: custody ends."""
        s = self._session(peer, session)
        if s.kind is SessionKind.MANAGED:
            raise errors.WrongSessionKind(
                session,
                s.kind.value,
                "only sessions a client created itself are handed back whole; use RetrieveFd",
            )
        if s.fd < 0:
            raise errors.NotReady(f"luod holds no fd for session '{session}'")
        if s.state is SessionState.OUTGOING:
            log.info(
                "session-copied", session=session, owner=s.owner.describe(), to=peer.describe()
            )
            return os.dup(s.fd)
        fd, s.fd = s.fd, -1
        del self.sessions[session]
        self.carrier.session_dropped(s.kernel_name)
        self._save()
        log.info(
            "session-returned",
            session=session,
            state=s.state.value,
            owner=s.owner.describe(),
            to=peer.describe(),
        )
        return fd

    def discard_session(self, peer: Peer, session: str) -> Session:
        # Nothing to settle in what is let go of (_drop closes it as it is).
        s = self._session(peer, session, settle=False)
        self._drop(s, f"discarded by {peer.describe()}")
        self._save()
        return s

    def _drop(self, s: Session, why: str) -> None:
        for f in s.files.values():
            self._unindex(f)
        s.close()
        incoming_fd = self.unsettled.pop(s.name, -1)
        if incoming_fd >= 0:
            # The kernel finishes a retrieved session when its fd is closed.
            os.close(incoming_fd)
        self.sessions.pop(s.name, None)
        self.carrier.session_dropped(s.kernel_name)
        log.info(
            "session-released",
            session=s.name,
            owner=s.owner.describe(),
            files=",".join(s.files) or "-",
            bytes=s.bytes_pinned,
            reason=why,
        )

    # --- grace, status, preflight --------------------------------------------

    def next_deadline(self) -> float | None:
        deadlines = [
            s.claim_deadline for s in self.sessions.values() if s.claim_deadline is not None
        ]
        return min(deadlines, default=None)

    def expire(self) -> list[str]:
        """Release what nobody claimed within the grace period."""
        now = self.clock()
        gone = [
            s
            for s in self.sessions.values()
            if s.claim_deadline is not None and s.claim_deadline <= now
        ]
        for s in gone:
            log.warning(
                "unclaimed-released",
                session=s.name,
                owner=s.owner.describe(),
                files=",".join(s.files) or "-",
                bytes=s.bytes_pinned,
                grace=self.grace,
            )
            self._drop(s, f"not claimed within {self.grace:g}s after the kexec")
        if gone:
            self._save()
        return [s.name for s in gone]

    def check(self) -> list[Problem]:
        """What would be lost if the kexec happened now, and why."""
        self.settle_all()
        problems: list[Problem] = []
        if self.manifest_error is not None:
            problems.append(
                Problem(
                    "", None, f"the incoming manifest is unusable: {self.manifest_error.message}"
                )
            )
        not_carried: dict[str, str] = {}
        for p in self.carrier.problems():
            if p.kernel_name is None:  # not about one session: about all of them
                problems.append(Problem("", None, p.reason))
            else:
                not_carried[p.kernel_name] = p.reason
        for s in self.sessions.values():
            if s.kernel_name in not_carried:
                problems.append(Problem(s.name, None, not_carried[s.kernel_name]))
            if s.fd < 0:
                problems.append(Problem(s.name, None, "luod holds no fd for this session"))
            elif s.state is SessionState.INCOMING:
                problems.append(
                    Problem(
                        s.name,
                        None,
                        "arrived with the last kexec and was not taken back by its owner; the kernel only "
                        "carries sessions created in the current boot, so it will be lost",
                    )
                )
            # An outgoing session luod holds carries its files; luod's own
            # references are missing only after a restart in this boot.
            carried = s.fd >= 0 and s.state is SessionState.OUTGOING
            for f in s.files.values():
                if f.fd < 0 and not carried:
                    problems.append(Problem(s.name, f.name, "luod holds no reference to this file"))
        return problems

    def status(self) -> dict[str, Any]:
        return {
            "sessions": len(self.sessions),
            "files": sum(len(s.files) for s in self.sessions.values()),
            "bytesPinned": sum(s.bytes_pinned for s in self.sessions.values()),
            "kexecCount": self.kexec_count,
        }

    def close(self) -> None:
        """luod is stopping without a kexec (tests, fallback): close all."""
        for s in self.sessions.values():
            s.close()
        for fd in self.unsettled.values():
            os.close(fd)
        self.unsettled.clear()


def _refusal(facts: fdinfo.FdFacts) -> str:
    if facts.kind is fdinfo.FdKind.LUO_SESSION:
        return "this is a LUO session; hand it over with AdoptSession, sessions are not nested"
    if facts.kind is fdinfo.FdKind.HUGETLB_MEMFD:
        return "the kernel cannot preserve hugetlb memfds"
    return f"the kernel can only preserve memfds (and tmpfs O_TMPFILE files); this is {facts.describe()}"
