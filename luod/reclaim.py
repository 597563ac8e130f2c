"""Reclaim: taking over what the previous luod left, and carrying it on.

At start luod reads the manifest its carrier kept and takes back every
session it names. After a kexec (`reclaimed`) this happens in two steps:
before luod is ready, every file of a managed session is retrieved, so it
can be handed out at once; afterwards, session by session, the incoming
session is finished and its files are preserved again into a new outgoing
one (`Reclaimer.preserve_again`), because the kernel only carries sessions
created in the current boot. A carrier that holds sessions across luod's
exit (the fd store) also hands them back to a luod restarted in the same
boot (`restored`), as they were: outgoing, and without luod's own
references to the files in them.

What came over a kexec waits for its owner for a grace period: using a
session claims it (luod.custody), and `Reclaimer.expire` releases what
nobody claimed in time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import time

from luod.crashpoint import reached
from luod.kernel.backend import LuoError
from luod.ledger import Ledger
from luod.log import get_logger
from luod.manifest import Manifest, ManifestError, from_json
from luod.model import HeldFile, Session, SessionKey, SessionKind, SessionState
from luod.record import record

log = get_logger()


@record
class ReclaimReport:
    """What luod's start found and took back of what was held before it."""

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
    # Per owner uid: [sessions, files] taken over, and whose each of `lost`
    # was, so that a non-root caller is told of its own only (for_uid).
    per_uid: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    lost_uids: list[int] = dataclasses.field(default_factory=list)

    def count(self, uid: int, sessions: int = 0, files: int = 0) -> None:
        self.sessions += sessions
        self.files += files
        c = self.per_uid.setdefault(uid, [0, 0])
        c[0] += sessions
        c[1] += files

    def lose(self, uid: int, what: str) -> None:
        self.lost.append(what)
        self.lost_uids.append(uid)

    def for_uid(self, uid: int) -> ReclaimReport:
        """The report as `uid` may see it: its own sessions, files and losses."""
        sessions, files = self.per_uid.get(uid, (0, 0))
        return dataclasses.replace(
            self,
            sessions=sessions,
            files=files,
            lost=[w for w, u in zip(self.lost, self.lost_uids, strict=True) if u == uid],
            per_uid={},
            lost_uids=[],
        )


class Reclaimer:
    def __init__(self, ledger: Ledger, grace: float) -> None:
        self.ledger = ledger
        # How long after a kexec an owner has to claim what came with it.
        self.grace = grace
        self.report: ReclaimReport | None = None
        self._preserving_since = 0.0

    def start(self) -> ReclaimReport:
        """Take over what the previous kernel carried, if anything."""
        ledger = self.ledger
        t0 = time.monotonic()
        try:
            incoming = ledger.carrier.load()
        except ManifestError as e:
            return self._unusable(e, t0)
        if incoming is None:
            self.report = ReclaimReport("fresh", duration=time.monotonic() - t0)
            ledger.carrier.finish_incoming()
            ledger.save()
            log.info("started-fresh", backend=ledger.backend.name, carrier=ledger.carrier.name)
            return self.report
        try:
            manifest = from_json(incoming.payload, incoming.records)
        except ManifestError as e:
            return self._unusable(e, t0, source=incoming.source)
        if ledger.boot_id and manifest.boot_id == ledger.boot_id:
            report = self._restore(manifest, _dirty(incoming.intent))
        else:
            report = self._reclaim(manifest)
        report.duration = time.monotonic() - t0
        self.report = report
        log.info(
            report.state,
            sessions=report.sessions,
            files=report.files,
            lost=len(report.lost),
            kexec_count=ledger.kexec_count,
            seconds=round(report.duration, 4),
        )
        return report

    def _unusable(self, e: ManifestError, t0: float, **where: str) -> ReclaimReport:
        self.ledger.manifest_error = e
        self.report = ReclaimReport("failed", error=e.message, duration=time.monotonic() - t0)
        log.error("manifest-unusable", kind=e.kind, reason=e.message, **where, released="nothing")
        return self.report

    def _reclaim(self, manifest: Manifest) -> ReclaimReport:
        ledger = self.ledger
        ledger.kexec_count = manifest.kexec_count + 1
        ledger.name_counter = manifest.name_counter
        ledger.previous_subscribers = set(manifest.subscribers)
        report = ReclaimReport("reclaimed")
        deadline = ledger.clock() + self.grace
        for old in manifest.sessions:
            managed = old.kind is SessionKind.MANAGED
            sfd = self._retrieve_or_report(old, report, quiet=managed)
            if sfd < 0 and not (managed and self._any_kept(old)):
                if managed:
                    _lose_session(
                        old, report, "the kernel did not carry it and luod kept none of its files"
                    )
                continue
            old.state = SessionState.INCOMING
            old.claim_deadline = deadline
            old.kexec_count = ledger.kexec_count
            ledger.add(old)
            report.count(old.owner.uid, sessions=1)
            if old.kind is SessionKind.MANAGED:
                # Only what makes the files retrievable happens before luod
                # is ready; preserve_again() carries custody on afterwards.
                self._retrieve_files(old, sfd, report)
                ledger.awaiting_preservation[old.key] = sfd
            else:
                old.fd = sfd
                log.info(
                    "session-arrived",
                    session=old.name,
                    kind=old.kind.value,
                    owner=old.owner.describe(),
                )
        for t in manifest.taking.values():
            # Taken out of their session before the kexec, and luod's own
            # references did not come over it.
            managed = t.kind is SessionKind.MANAGED
            reason = (
                f"taken, but luod had not seen the reply that carried {'them' if managed else 'it'} "
                "go out before the kexec (luod died first, or the kexec came while the reply waited)"
            )
            if managed:
                for f in list(t.files.values()):
                    _lose_file(t, f, report, reason)
            else:
                _lose_session(t, report, reason)
        # What a luod that died while preserving again left and the
        # manifest does not name (a new session not committed yet) goes
        # before anything is preserved again: its files are in it.
        ledger.carrier.release_unclaimed()
        reached("reclaim.retrieved")
        if ledger.awaiting_preservation:
            report.preserved_again = None
        else:
            self._all_preserved_again(report)
        return report

    def _retrieve_or_report(self, s: Session, report: ReclaimReport, quiet: bool = False) -> int:
        """The carrier's fd for a session named in the manifest, or -1 with
        the loss recorded in `report` and logged (`quiet`: the caller
        decides, luod may have kept the files)."""
        try:
            return self.ledger.carrier.retrieve_session(s.kernel_name)
        except LuoError as e:
            if quiet:
                # Luod kept the files, perhaps: the caller rebuilds the
                # session from them or records what is lost.
                log.warning(
                    "session-missing",
                    session=s.name,
                    kernel_name=s.kernel_name,
                    owner=s.owner.describe(),
                    reason=f"the {self.ledger.carrier.name} carrier has no such session "
                    "(let go of by a change the previous luod did not commit, or not carried)",
                )
                return -1
            _lose_session(s, report, str(e))
            return -1

    def _restore(self, manifest: Manifest, dirty: dict[SessionKey, int]) -> ReclaimReport:
        """luod was restarted in this boot: the carrier kept every session
        fd, so the sessions are taken back as they were, outgoing (or still
        incoming if not preserved again since the last kexec), and with them
        luod's references to their files where the carrier kept those (the
        fd store): copies can be handed out at once. Without a reference
        (the kernel cannot hand a file back out of an outgoing session) a
        file can be copied only after the next kexec; check() does not
        count that as a problem, the kernel carries it.

        The previous luod may have died in the middle of a change: the
        sessions its intent names (`dirty`: session -> the highest token
        given out) and those whose kernel session is gone are rebuilt from
        the references into a fresh kernel session, after everything the
        manifest does not name was released. So the kernel holds exactly
        what the manifest says, and no token stays used."""
        ledger = self.ledger
        ledger.kexec_count = manifest.kexec_count
        ledger.name_counter = manifest.name_counter
        ledger.known_subscribers = set(manifest.subscribers)
        report = ReclaimReport("restored")
        rebuild: list[Session] = []
        for s in manifest.sessions:
            fd = self._retrieve_or_report(s, report, quiet=s.kind is SessionKind.MANAGED)
            s.kexec_count = ledger.kexec_count
            if s.kind is not SessionKind.MANAGED:
                if fd < 0:
                    continue
                s.fd = fd
            elif s.state is SessionState.INCOMING:
                # The previous luod died before it preserved this session
                # again: FINISH (again, it may have done so) and preserve
                # again from the kept references; what it did not keep
                # the incoming session hands out again unless finished.
                self._retrieve_files(s, fd, report)
                ledger.awaiting_preservation[s.key] = fd
            else:
                # References the manifest does not name: a change that was
                # not committed; rebuilt like one the intent names.
                extra = self._attach_kept(s)
                whole = all(f.fd >= 0 for f in s.files.values())
                if s.key in dirty:
                    s.token_high = max(s.token_high, dirty[s.key])
                if (fd < 0 or s.key in dirty or extra) and whole:
                    s.fd = fd
                    rebuild.append(s)
                elif fd < 0:
                    # Gone with the files luod kept no reference to: the
                    # others are preserved again.
                    self._lose_unheld(s, report, "its kernel session is gone")
                    if not s.files:
                        continue
                    rebuild.append(s)
                else:
                    s.fd = fd
                    if s.key in dirty:
                        log.warning(
                            "session-not-rebuilt",
                            session=s.name,
                            owner=s.owner.describe(),
                            reason="luod keeps no reference to some of its files; "
                            "the kernel may hold a file the manifest does not name",
                        )
                for f in s.files.values():
                    if f.fd >= 0:
                        ledger.index(s, f)
                report.count(s.owner.uid, files=len(s.files))
            ledger.add(s)
            report.count(s.owner.uid, sessions=1)
            log.info(
                "session-restored",
                session=s.name,
                kind=s.kind.value,
                state=s.state.value,
                owner=s.owner.describe(),
                files=len(s.files),
                held=sum(1 for f in s.files.values() if f.fd >= 0),
            )
        for t in manifest.taking.values():
            self._take_back(t)
        # Released first: a session the previous luod created and did not
        # commit may hold the very files rebuilt below.
        ledger.carrier.release_unclaimed()
        replaced: list[str] = []
        for s in rebuild:
            try:
                replaced.append(
                    ledger.represerve(s, s.files.values(), "rebuild.dropped", "rebuild.represerved")
                )
            except LuoError as e:
                log.error("rebuild-failed", session=s.name, owner=s.owner.describe(), reason=str(e))
                continue
            log.info(
                "session-rebuilt",
                session=s.name,
                kernel_name=s.kernel_name,
                owner=s.owner.describe(),
                files=len(s.files),
                reason="the previous luod died while changing it",
            )
        if ledger.awaiting_preservation:
            report.preserved_again = None
        ledger.carrier.finish_incoming()
        ledger.save()
        if replaced:
            reached("rebuild.committed")
        for kernel_name in replaced:
            ledger.release_kept(kernel_name)
        return report

    def _take_back(self, t: Session) -> None:
        """A take the previous luod did not settle (its reply may not have
        gone out): what the carrier kept for it is taken back and recorded
        as a take of this luod's, which holds it again once started
        (Custodian.start). Before release_unclaimed(): it keeps nothing the
        manifest does not name."""
        ledger = self.ledger
        if t.kind is SessionKind.MANAGED:
            self._attach_kept(t)
        else:
            with contextlib.suppress(LuoError):
                t.fd = ledger.carrier.retrieve_session(t.kernel_name)
        ledger.record_take(t)

    def _any_kept(self, s: Session) -> bool:
        """Whether the carrier kept a reference to any file of `s` (then a
        session the kernel did not carry is not lost with them)."""
        self._attach_kept(s)
        return any(f.fd >= 0 for f in s.files.values())

    def _attach_kept(self, s: Session) -> bool:
        """luod's references to the files of `s` the carrier kept, if any;
        True when it kept some the manifest does not name (closed here)."""
        kept = self.ledger.carrier.kept_files(s.kernel_name)
        for f in s.files.values():
            fd = kept.pop(f.token, -1)
            if f.fd < 0:
                f.fd = fd
            elif fd >= 0:
                os.close(fd)
        for fd in kept.values():
            os.close(fd)
        return bool(kept)

    def _lose_unheld(self, s: Session, report: ReclaimReport, reason: str) -> None:
        """Record every file of `s` luod holds no reference to as lost."""
        for f in [f for f in s.files.values() if f.fd < 0]:
            _lose_file(s, f, report, reason)

    def _retrieve_files(self, s: Session, incoming_fd: int, report: ReclaimReport) -> None:
        """luod's reference to every file of an incoming managed session:
        the one the carrier kept (a luod that died while preserving it
        again), else retrieved from the incoming session; a file the kernel
        cannot give back is recorded as lost."""
        self._attach_kept(s)
        for f in list(s.files.values()):
            if f.fd >= 0:
                report.count(s.owner.uid, files=1)
                continue
            try:
                if incoming_fd < 0:
                    raise LuoError("retrieve_fd", errno.ENOENT, "its incoming session is gone")
                f.fd = self.ledger.backend.retrieve_fd(incoming_fd, f.token)
            except LuoError as e:
                _lose_file(s, f, report, str(e))
                continue
            report.count(s.owner.uid, files=1)

    def preserve_again(self, key: SessionKey | None = None) -> bool:
        """Carry custody on for one session that came over the kexec (`key`,
        or the next one waiting): FINISH its incoming session and preserve
        its files again into a new outgoing one. A retrieved file counts as
        preserved until its incoming session is finished, so FINISH comes
        first. True while more sessions are waiting."""
        ledger = self.ledger
        waiting = ledger.awaiting_preservation
        if key is None:
            key = next(iter(waiting), None)
        if key is None or key not in waiting:
            return bool(waiting)
        if not self._preserving_since:
            self._preserving_since = time.monotonic()
        s = ledger.sessions[key]
        incoming_fd = waiting.pop(key)
        incoming_name = s.kernel_name
        # After FINISH the kernel hands nothing out of the incoming session:
        # luod's references are all there is, so the carrier keeps them
        # first (a luod restarted from here on takes them back).
        ledger.keep(s, s.files.values())
        reached("again.kept")
        if incoming_fd >= 0:
            try:
                # FINISH twice is harmless: a restarted luod does it again.
                ledger.backend.finish_session(incoming_fd)
            except LuoError as e:
                log.error("finish-failed", session=s.name, owner=s.owner.describe(), reason=str(e))
        reached("again.finished")
        for f in s.files.values():
            ledger.index(s, f)
        try:
            ledger.represerve(s, s.files.values(), represerved="again.represerved")
        except LuoError as e:
            # The files are held and usable in this boot; check() reports
            # that they would not survive the next kexec.
            log.error("represerve-failed", session=s.name, owner=s.owner.describe(), reason=str(e))
        if ledger.carrier.holds_after_exit:
            # A luod restarted from now on must find the new session by its
            # name: the manifest says it before the carrier lets go of the
            # incoming one (finished, it has nothing left to give).
            ledger.commit(s)
            reached("again.committed")
        if incoming_fd >= 0:
            os.close(incoming_fd)
        ledger.carrier.session_dropped(incoming_name)
        if s.kernel_name != incoming_name:  # else they are all luod keeps of them
            ledger.release_kept(incoming_name)
        log.info(
            "session-arrived",
            session=s.name,
            kind=s.kind.value,
            owner=s.owner.describe(),
            files=len(s.files),
        )
        if not waiting and self.report is not None:
            self._all_preserved_again(self.report)
        return bool(waiting)

    def preserve_all_again(self) -> None:
        while self.preserve_again():
            pass

    def _all_preserved_again(self, report: ReclaimReport) -> None:
        """Every session that came over is held as it will be carried: the
        previous boot's state is finished with and the manifest written."""
        self.ledger.carrier.finish_incoming()
        self.ledger.save()
        if self._preserving_since:
            report.preserved_again = time.monotonic() - self._preserving_since
            log.info(
                "custody-resumed",
                sessions=report.sessions,
                files=report.files,
                seconds=round(report.preserved_again, 4),
            )

    # --- the grace period --------------------------------------------------------

    def next_deadline(self, uid: int | None = None) -> float | None:
        """The next claim deadline of all sessions, or (`uid`) of one owner's."""
        deadlines = [
            s.claim_deadline
            for s in self.ledger.sessions.values()
            if s.claim_deadline is not None and (uid is None or s.owner.uid == uid)
        ]
        return min(deadlines, default=None)

    def expire(self) -> list[str]:
        ledger = self.ledger
        now = ledger.clock()
        gone = [
            s
            for s in ledger.sessions.values()
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
        if gone:
            ledger.drop_all(gone, f"not claimed within {self.grace:g}s after the kexec")
        return [s.name for s in gone]


def _lose_file(s: Session, f: HeldFile, report: ReclaimReport, reason: str) -> None:
    """Record the file `f` of `s` as lost (it leaves `s`), and log it."""
    log.error(
        "fd-lost",
        session=s.name,
        name=f.name,
        token=f.token,
        owner=s.owner.describe(),
        reason=reason,
    )
    del s.files[f.name]
    report.lose(s.owner.uid, f"{s.name}/{f.name}")


def _lose_session(s: Session, report: ReclaimReport, reason: str) -> None:
    """Record `s` as lost, and log it with every file in it."""
    log.error(
        "session-lost",
        session=s.name,
        kernel_name=s.kernel_name,
        owner=s.owner.describe(),
        files=",".join(s.files) or "-",
        reason=reason,
    )
    report.lose(s.owner.uid, s.name)


def _dirty(intent: bytes | None) -> dict[SessionKey, int]:
    """The sessions an uncommitted change may have left half-changed
    (luod.ledger.Ledger.intend), with the highest token it gave out."""
    if intent is None:
        return {}
    try:
        doc = json.loads(intent)
        out = {(int(d["uid"]), str(d["name"])): int(d["tokenHigh"]) for d in doc["dirty"]}
    except (ValueError, KeyError, TypeError) as e:
        # An intent luod cannot read: every session is rebuilt below only
        # if its kernel session is gone; log what was not understood.
        log.error("intent-unreadable", reason=str(e))
        return {}
    log.warning(
        "intent-found",
        sessions=",".join(f"{uid}/{name}" for uid, name in out) or "-",
        reason="the previous luod died in the middle of a change",
    )
    return out
