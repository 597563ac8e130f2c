"""What a crash of luod would cost right now: what it holds that its
exit (kill -9, the OOM killer, a bug) would release, and why.

Read-only over the ledger, as luod.preflight (the same question for a
kexec). The carrier decides the answer:
- one that keeps nothing across luod's exit (`holds_after_exit` False: the
  state-session carrier) loses everything luod holds: luod holds every
  session fd itself, closing a session's last fd unpreserves it, and no one
  outside luod holds a copy;
- one whose service manager keeps luod's fd store (the fd-store carrier)
  loses only what the carrier reports it failed to keep: a session it names
  in problems(), or everything when a problem of its own state (not one
  session's) is marked `on_exit` (say, the manifest is not in the store).
  Its other problems concern the next kexec only.
GetStatus and Check report it (luod.varlink.manager), to anyone but root
for its own sessions only.
"""

from __future__ import annotations

from luod.ledger import Ledger
from luod.model import Session
from luod.preflight import Problem
from luod.record import record


@record(frozen=True)
class CrashCost:
    """What luod's exit now would release, in all or of one uid."""

    sessions: int
    files: int
    bytes_pinned: int
    # All luod holds (of the uid asked about), for one reason.
    everything: bool
    # Why, in one sentence: the carrier's rule.
    reason: str
    # The sessions concerned one by one, when not everything is lost.
    problems: list[Problem]


def crash_cost(ledger: Ledger, uid: int | None = None) -> CrashCost:
    """What luod's exit now would release of what it holds (for `uid`)."""
    carrier = ledger.carrier
    held = list(ledger.sessions.values() if uid is None else ledger.owned_by(uid))
    if not carrier.holds_after_exit:
        reason = (
            f"luod holds every session fd itself ({carrier.name} carrier) and nothing outside "
            "luod holds a copy; its exit closes them, and the kernel unpreserves a session "
            "whose last fd is closed"
        )
        return _cost(held, True, reason, [])
    problems = carrier.problems()
    for p in problems:
        # A problem of the carrier's own state that a restart in this boot
        # would feel too (not only the next kexec): the manifest not in the store.
        if p.kernel_name is None and p.on_exit:
            return _cost(held, True, f"{p.reason} ({carrier.name} carrier)", [])
    lost = {p.kernel_name: p.reason for p in problems if p.kernel_name is not None}
    concerned = [s for s in held if s.kernel_name in lost]
    if not concerned:
        reason = (
            f"the service manager's fd store ({carrier.name} carrier) keeps luod's session fds, "
            "its manifest and its references to every file; a restarted luod takes them back"
        )
        return _cost([], False, reason, [])
    reason = (
        f"the service manager's fd store ({carrier.name} carrier) keeps all but the sessions "
        "listed, whose fds are not in it"
    )
    listed = [Problem(s.name, None, lost[s.kernel_name], s.owner.uid) for s in concerned]
    return _cost(concerned, False, reason, listed)


def _cost(
    sessions: list[Session], everything: bool, reason: str, problems: list[Problem]
) -> CrashCost:
    return CrashCost(
        sessions=len(sessions),
        files=sum(len(s.files) for s in sessions),
        bytes_pinned=sum(s.bytes_pinned for s in sessions),
        everything=everything,
        reason=reason,
        problems=problems,
    )
