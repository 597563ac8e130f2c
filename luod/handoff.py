"""Hand-off: memfds a client gives luod to carry over the kexec.

A hand-off goes into a managed session of the caller's own (created with
it if asked), never into another uid's. It is all or nothing: every name,
fd and quota is checked before anything changes, and a kernel refusal part
way through is undone. Every fd that comes with a hand-off is kept (in the
session) or closed before `preserve_fds` returns, also on error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from luod import errors
from luod.crashpoint import reached
from luod.kernel import fdinfo
from luod.kernel.backend import LuoError
from luod.ledger import Ledger
from luod.log import get_logger
from luod.model import HeldFile, Session, SessionKind
from luod.names import check_fd_name, check_session_name
from luod.peer import Peer
from luod.record import record

if TYPE_CHECKING:
    from luod.custody import Custodian

log = get_logger()


@record
class Handoff:
    """A file a client hands off: its name, fd (owned), and where in the
    call it came from."""

    name: str
    fd: int
    # Where in the call it came from, e.g. "files[2]"; "" for top-level parameters.
    where: str = ""

    def parameter(self, field: str) -> str:
        return f"{self.where}.{field}" if self.where else field


def preserve_fds(
    c: Custodian, peer: Peer, session: str, files: Sequence[Handoff], create: bool = False
) -> list[HeldFile]:
    """Hand off memfds into `peer`'s managed session `session`. All or nothing."""
    try:
        return _preserve_fds(c, peer, session, files, create)
    finally:
        for h in files:
            if h.fd >= 0:
                os.close(h.fd)


def _preserve_fds(
    c: Custodian, peer: Peer, session: str, files: Sequence[Handoff], create: bool
) -> list[HeldFile]:
    ledger = c.ledger
    ledger.require_usable()
    # Files that came over the kexec are indexed (AlreadyPreserved) when
    # their session is preserved again.
    c.preserve_all_again()
    created = False
    # Always the caller's own session: a hand-off never goes into
    # another uid's, not even root's (it would give the files away).
    key = (peer.uid, session)
    if create and key not in ledger.sessions:
        check_session_name(session)
    else:
        s = c.use_session(peer, session)
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
    existing = ledger.sessions.get(key)
    taken: Mapping[str, HeldFile] = {} if existing is None else existing.files
    inspect_fd, memfd, holder_of = fdinfo.inspect_fd, fdinfo.FdKind.MEMFD, ledger.holder_of
    for h in files:
        check_fd_name(h.name, h.parameter("name"))
        if h.name in names or h.name in taken:
            raise errors.FdNameExists(session, h.name)
        names.add(h.name)
        facts = inspect_fd(h.fd)
        if facts.kind is not memfd:
            raise errors.UnsupportedFd(
                h.parameter("fileDescriptor"), facts.kind.value, _refusal(facts)
            )
        held = holder_of((facts.dev, facts.ino))
        if held is not None:
            (uid, held_session), held_name = held
            if uid != peer.uid:
                # Say that it is held, not where: that is another's.
                held_session, held_name = "(another user's)", "?"
            raise errors.AlreadyPreserved(h.parameter("fileDescriptor"), held_session, held_name)
        checked.append(facts)
    c.quotas.check(
        peer.uid,
        ledger,
        sessions=0 if key in ledger.sessions else 1,
        files=len(files),
        size=sum(f.size for f in checked),
    )
    if key not in ledger.sessions:
        # Committed together with the files, or not at all.
        c.create_session(peer, session, commit=False)
        created = True
    s = ledger.sessions[key]
    # The tokens first: the intent says the highest, so that none of them
    # is given out again by a luod that cannot rebuild the session.
    tokens = [s.next_token() for _ in files]
    # Write-ahead: a luod restarted before the commit below rebuilds the
    # session as the manifest has it (and releases one it does not name).
    ledger.intend(s)
    reached("handoff.intent")
    now = ledger.clock()
    added: list[HeldFile] = []
    preserve, index = ledger.backend.preserve_fd, ledger.index
    try:
        for h, facts, token in zip(files, checked, tokens, strict=True):
            # name, token, size, preserved_at, fd
            f = HeldFile(h.name, token, facts.size, now, h.fd)
            preserve(s.fd, f.fd, f.token)
            h.fd = -1  # owned by `added` from here on, the session's below
            added.append(f)
            index(s, f, (facts.dev, facts.ino))
    except LuoError as e:
        _rollback(ledger, s, added, created)
        raise errors.kernel_refused("preserve_fd", e.errno, e.message, session) from None
    except BaseException:
        s.files.add(added)  # what is preserved is the session's, fds and all
        raise
    s.files.add(added)
    reached("handoff.preserved")
    ledger.keep(s, added)
    reached("handoff.kept")
    # The record names the new files only (the whole session if it is new).
    ledger.commit_added(s, added)
    reached("handoff.committed")
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


def _rollback(ledger: Ledger, s: Session, added: list[HeldFile], created: bool) -> None:
    """Undo a partial hand-off (`added`: preserved, not in the session's
    files yet): nothing may change on bad input."""
    for f in added:
        ledger.unindex(f)
        f.close()
    if created:
        ledger.drop(s, "hand-off failed")
        return
    if added:
        old = ledger.represerve(s, s.files.values())
        ledger.commit(s)
        ledger.release_kept(old)
        return
    ledger.commit(s)


def _refusal(facts: fdinfo.FdFacts) -> str:
    if facts.kind is fdinfo.FdKind.LUO_SESSION:
        return "this is a LUO session; hand it over with AdoptSession, sessions are not nested"
    if facts.kind is fdinfo.FdKind.HUGETLB_MEMFD:
        return "the kernel cannot preserve hugetlb memfds"
    return f"the kernel can only preserve memfds (and tmpfs O_TMPFILE files); this is {facts.describe()}"
