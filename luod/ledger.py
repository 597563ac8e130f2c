"""The ledger of custody: what luod holds, and the few changes every custody
step is made of, each keeping the kernel, the carrier and the manifest in
agreement.

What it records: the sessions by owner and name (SessionKey), which held file is which (by inode,
to refuse a file handed off twice), the managed sessions that came over the
kexec and wait to be preserved again, the counters and the subscribers
written into the manifest. The changes: write the manifest (`save`), carry
a session's files in a brand-new kernel session (`represerve`), let go of a
session (`drop`). Who may do what, and when, is decided by the callers
(luod.custody, luod.reclaim); nothing here checks a peer.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from luod import errors
from luod.carriers import Carrier
from luod.crashpoint import reached
from luod.kernel.backend import Backend, LuoError
from luod.log import get_logger
from luod.manifest import Manifest, ManifestError, change_json, to_json
from luod.model import HeldFile, Holdings, Session, SessionKey, SessionState, Tally
from luod.names import kernel_session_name

log = get_logger()

# How long to wait for the carrier to let go of a dropped session's fd
# (Carrier.settle: the service manager, not a client, decides how long).
REPRESERVE_PATIENCE = 3.0

# (st_dev, st_ino) of a held file.
InodeKey = tuple[int, int]


class Ledger:
    def __init__(
        self,
        backend: Backend,
        carrier: Carrier,
        clock: Callable[[], float] = time.time,
        boot_id: str = "",
    ) -> None:
        self.backend = backend
        self.carrier = carrier
        self.clock = clock
        # Written into the manifest: a manifest of this very boot means luod
        # was restarted, not kexeced. "" (unknown) never matches.
        self.boot_id = boot_id
        # Every session, and each owner's by name: what one owner holds is
        # counted without looking at anyone else's (issue 12). Changed only
        # through add() and remove().
        self._sessions: dict[SessionKey, Session] = {}
        self._by_uid: dict[int, dict[str, Session]] = {}
        # What changed since the manifest last recorded it: commit() writes
        # just that (a record appended to the manifest's log).
        self._changed: dict[SessionKey, Session] = {}
        self._gone: set[SessionKey] = set()
        self.kexec_count = 0
        # How many kernel sessions luod has named so far, across kexecs.
        self.name_counter = 0
        # Subscribers of this boot, and of the boot before the last kexec.
        # (name, uid): names are per uid.
        self.known_subscribers: set[tuple[str, int]] = set()
        self.previous_subscribers: set[tuple[str, int]] = set()
        # Set when the incoming manifest could not be read: luod then
        # releases nothing and takes no new custody (require_usable).
        self.manifest_error: ManifestError | None = None
        # Managed sessions that came over the kexec: every file is retrieved
        # and held (copies can be handed out), but the session is still the
        # incoming one, to be finished and preserved again (luod.reclaim).
        self.awaiting_preservation: dict[SessionKey, int] = {}  # -> incoming session fd
        self._by_inode: dict[InodeKey, tuple[SessionKey, str]] = {}
        # Takes whose reply has not gone out yet (luod.custody), by a number
        # of their own: the session as taken from, with the files taken
        # only, under the name the carrier keeps luod's references to them
        # under until the take is settled (record_take(), end_take()); and
        # those recorded and settled since the last record.
        self._taking: dict[int, Session] = {}
        self._took: dict[int, Session] = {}
        self._settled: set[int] = set()
        self._takes = 0  # numbers given to takes so far
        # The files of every session held, and their bytes, root's and every
        # other uid's apart: HeldFiles count into them.
        self._root_tally = Tally()
        self._user_tally = Tally()

    # --- what is held ----------------------------------------------------------

    @property
    def sessions(self) -> Mapping[SessionKey, Session]:
        return self._sessions

    def owned_by(self, uid: int) -> Iterable[Session]:
        return self._by_uid.get(uid, {}).values()

    def add(self, s: Session) -> None:
        """Hold `s` (recorded with the next commit)."""
        old = self._sessions.get(s.key)
        if old is not s:
            if old is not None:
                self._untally(old)
            tally = self._root_tally if s.owner.uid == 0 else self._user_tally
            s.files.tally = tally
            tally.files += len(s.files)
            tally.bytes += s.files.size
        self._sessions[s.key] = s
        self._by_uid.setdefault(s.owner.uid, {})[s.name] = s
        self._changed[s.key] = s

    def _untally(self, s: Session) -> None:
        tally = s.files.tally
        assert tally is not None, s.key
        tally.files -= len(s.files)
        tally.bytes -= s.files.size
        s.files.tally = None

    def remove(self, key: SessionKey) -> Session | None:
        """Stop holding the session `key` (recorded with the next commit);
        its fds are the caller's to close."""
        s = self._sessions.pop(key, None)
        if s is not None:
            self._untally(s)
            own = self._by_uid[key[0]]
            del own[key[1]]
            if not own:
                del self._by_uid[key[0]]
            self._changed.pop(key, None)
            self._gone.add(key)
        return s

    def changed(self, s: Session) -> None:
        """`s` changed in a way the next commit must record (a claim)."""
        self._changed[s.key] = s

    def holdings(self, uid: int | None = None) -> Holdings:
        """What luod holds in all, or (`uid`) for one owner."""
        held = list(self._sessions.values() if uid is None else self.owned_by(uid))
        return Holdings(
            sessions=len(held),
            files=sum(len(s.files) for s in held),
            bytes_pinned=sum(s.bytes_pinned for s in held),
        )

    def held_fds(self) -> int:
        """Sessions and files held, of every uid: each an fd of luod's."""
        return len(self._sessions) + self._root_tally.files + self._user_tally.files

    def users_bytes(self) -> int:
        """Bytes pinned in the files of every uid but root together."""
        return self._user_tally.bytes

    def require_usable(self) -> None:
        if self.manifest_error is not None:
            raise errors.NotReady(
                f"the incoming manifest is unusable ({self.manifest_error.message}); "
                "luod releases nothing and accepts no new custody until an operator resolves it"
            )

    def holder_of(self, key: InodeKey) -> tuple[SessionKey, str] | None:
        """(session, name) of the held file with inode `key`, if any."""
        return self._by_inode.get(key)

    def index(self, s: Session, f: HeldFile, key: InodeKey | None = None) -> None:
        if key is None:
            st = os.fstat(f.fd)
            key = (st.st_dev, st.st_ino)
        self._by_inode[key] = (s.key, f.name)

    def unindex(self, f: HeldFile) -> None:
        if f.fd >= 0:
            st = os.fstat(f.fd)
            self._by_inode.pop((st.st_dev, st.st_ino), None)

    # --- the manifest ----------------------------------------------------------

    def manifest(self, sessions: bool = True) -> Manifest:
        """The manifest as luod holds now (`sessions`: with them)."""
        return Manifest(
            sessions=list(self._sessions.values()) if sessions else [],
            kexec_count=self.kexec_count,
            name_counter=self.name_counter,
            written_at=self.clock(),
            boot_id=self.boot_id,
            subscribers=self.known_subscribers,
            taking=dict(self._taking) if sessions else {},
        )

    def save(self) -> None:
        """Write the whole manifest."""
        if self.manifest_error is not None:
            # Writing would shadow the incoming state the operator must see.
            return
        self.carrier.save(to_json(self.manifest()))
        self._changed.clear()
        self._gone.clear()
        self._took.clear()
        self._settled.clear()

    def commit(self, *changed: Session) -> None:
        """Record what changed: `changed`, the sessions added, let go of or
        marked changed() since the last record, and everything but the
        sessions. One record appended to the manifest, in proportion to
        what changed (a whole manifest when the carrier asks for one)."""
        self._commit(changed, ())

    def commit_added(self, s: Session, files: Sequence[HeldFile]) -> None:
        """commit(s) where all that changed in `s` is `files` added to it:
        the record names just those files, unless `s` is to be written whole
        anyway (new, or changed otherwise since the last record)."""
        if s.key in self._changed:
            self._commit((s,), ())
        else:
            self._commit((), ((s, files),))

    def _commit(
        self, changed: Iterable[Session], added: Sequence[tuple[Session, Sequence[HeldFile]]]
    ) -> None:
        if self.manifest_error is not None:
            return
        for s in changed:
            self._changed[s.key] = s
        put = [s for key, s in self._changed.items() if self._sessions.get(key) is s]
        record = change_json(
            self.manifest(sessions=False),
            put,
            sorted(self._gone),
            added,
            list(self._took.items()),
            sorted(self._settled),
        )
        if self.carrier.append(record):
            self._changed.clear()
            self._gone.clear()
            self._took.clear()
            self._settled.clear()
        else:
            self.save()

    # --- takes whose reply has not gone out ----------------------------------

    @property
    def taking(self) -> Mapping[int, Session]:
        return self._taking

    def record_take(self, taken: Session) -> int:
        """Record a take whose reply is still to go out (with the next
        commit): `taken`, what it took. Its number."""
        self._takes += 1
        self._taking[self._takes] = taken
        self._took[self._takes] = taken
        return self._takes

    def end_take(self, take: int) -> Session | None:
        """The take `take` is settled (recorded with the next commit): what
        it took, or None if it was settled already."""
        taken = self._taking.pop(take, None)
        if taken is not None and self._took.pop(take, None) is None:
            self._settled.add(take)
        return taken

    def note_subscriber(self, name: str, uid: int) -> None:
        """Remember who subscribed in this boot, so that after the kexec
        they are told what came with them ("resumed")."""
        if (name, uid) not in self.known_subscribers:
            self.known_subscribers.add((name, uid))
            self.commit()

    # --- write-ahead --------------------------------------------------------------

    def intend(self, *sessions: Session) -> None:
        """Record, before the first kernel step of a change, which sessions
        it may leave half-changed: a luod restarted before the change is
        committed (the next save) rebuilds them from the references the
        carrier kept (luod.reclaim). `tokenHigh`: no token up to it may be
        given out again, in case a session cannot be rebuilt. Nothing to
        record where luod's exit releases everything anyway."""
        if not self.carrier.holds_after_exit:
            return
        self.carrier.intend(
            json.dumps(
                {
                    "dirty": [
                        {"uid": s.owner.uid, "name": s.name, "tokenHigh": s.token_high}
                        for s in sessions
                    ]
                },
                separators=(",", ":"),
            ).encode()
        )

    # --- luod's own references to the files ------------------------------------

    def keep(self, s: Session, files: Iterable[HeldFile]) -> None:
        """Have the carrier keep luod's references to `files` of `s` (under
        its kernel session's name), so that a crash of luod does not take
        them along."""
        self.carrier.keep_files(s.kernel_name, [(f.token, f.fd) for f in files if f.fd >= 0])

    def release_kept(self, kernel_name: str) -> None:
        """Let go of the references kept for the kernel session
        `kernel_name` (after a commit that no longer needs them)."""
        self.carrier.release_files(kernel_name)

    # --- kernel sessions -------------------------------------------------------

    def new_kernel_name(self, uid: int, name: str) -> str:
        self.name_counter += 1
        return kernel_session_name(self.name_counter, uid, name)

    def _create_kernel_session(self, s: Session) -> tuple[str, int]:
        """A new outgoing kernel session for `s`. A name may be taken still
        by a session a crashed luod created and the restarted one released
        (the store lets go of it asynchronously): then the next one."""
        for _ in range(64):
            kernel_name = self.new_kernel_name(s.owner.uid, s.name)
            try:
                return kernel_name, self.backend.create_session(kernel_name)
            except LuoError as e:
                if e.errno != errno.EEXIST:
                    raise
                log.warning("kernel-name-taken", kernel_name=kernel_name, session=s.name)
        raise LuoError("create_session", errno.EEXIST, f"no free kernel name for '{s.name}'")

    def represerve(
        self,
        s: Session,
        files: Iterable[HeldFile],
        dropped: str | None = None,
        represerved: str | None = None,
    ) -> str:
        """Put `files` (fds luod holds) into a brand-new outgoing session for
        `s`, and have the carrier keep luod's references to them under its
        name. The kernel has no 'unpreserve one file' and keeps a file in one
        session at a time (EBUSY), so the old session goes first: closing its
        last fd unpreserves everything in it. If the new one cannot be made,
        luod still holds the files but the session is not carried: check()
        says so and the preflight refuses the kexec. `dropped` and
        `represerved` name the steps passed (luod.crashpoint). Returns the
        old kernel session's name: the references kept under it are the
        caller's to release once the change is committed."""
        files = list(files)
        old_fd, old_kernel = s.fd, s.kernel_name
        s.fd = -1
        if old_fd >= 0:
            os.close(old_fd)
            self.carrier.session_dropped(old_kernel)
        if dropped is not None:
            reached(dropped)
        kernel_name, sfd = self._create_kernel_session(s)
        try:
            self._preserve_once_settled(sfd, files, s.name)
        except BaseException:
            os.close(sfd)
            raise
        s.fd, s.kernel_name, s.state = sfd, kernel_name, SessionState.OUTGOING
        self.carrier.session_held(kernel_name, sfd)
        self.keep(s, files)
        if represerved is not None:
            reached(represerved)
        return old_kernel

    def _preserve_once_settled(self, sfd: int, files: list[HeldFile], session: str) -> None:
        """Preserve `files` into the new session `sfd`. A carrier that holds
        copies of session fds (PID 1's fd store) lets go of them
        asynchronously: until it has, files are still preserved in the old
        session (or in one a crashed luod left) and preserving them is
        EBUSY. Then luod waits, once, until the carrier has let go of every
        session it was told to, and tries again. A file busy after that is
        in a session of someone else's (a client can put its own copy of a
        file into a session of its own the moment it is free): waiting on
        would hold up every caller of luod, which serves from one thread,
        for as long as that client liked."""
        settled = not self.carrier.holds_after_exit
        for f in files:
            try:
                self.backend.preserve_fd(sfd, f.fd, f.token)
                continue
            except LuoError as e:
                if e.errno != errno.EBUSY or settled:
                    raise
            started = time.monotonic()
            self.carrier.settle(REPRESERVE_PATIENCE)
            settled = True
            self.backend.preserve_fd(sfd, f.fd, f.token)
            # Once a change at most; says how long the carrier kept a change
            # of luod's waiting (PID 1, busy with others' messages).
            log.info(
                "represerve-waited",
                session=session,
                name=f.name,
                carrier=self.carrier.name,
                seconds=round(time.monotonic() - started, 4),
            )

    # --- letting go ------------------------------------------------------------

    def drop(self, s: Session, why: str) -> None:
        """Let go of `s` and everything in it."""
        self.drop_all([s], why)

    def drop_all(self, gone: Iterable[Session], why: str) -> None:
        """Let go of sessions and everything in them. The manifest stops
        naming them first (the commit), then they are released: a luod
        restarted in between releases what the manifest does not name."""
        gone = list(gone)
        for s in gone:
            self.remove(s.key)
        self.commit()
        reached("release.committed")
        for s in gone:
            for f in s.files.values():
                self.unindex(f)
            self.release_kept(s.kernel_name)
            s.close()
            incoming_fd = self.awaiting_preservation.pop(s.key, -1)
            if incoming_fd >= 0:
                # The kernel finishes a retrieved session when its fd is closed.
                os.close(incoming_fd)
            self.carrier.session_dropped(s.kernel_name)
            log.info(
                "session-released",
                session=s.name,
                owner=s.owner.describe(),
                files=",".join(s.files) or "-",
                bytes=s.bytes_pinned,
                reason=why,
            )

    def close(self) -> None:
        """luod is stopping without a kexec (tests, fallback): close all."""
        for s in self.sessions.values():
            s.close()
        for fd in self.awaiting_preservation.values():
            os.close(fd)
        self.awaiting_preservation.clear()
