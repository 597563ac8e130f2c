"""Named steps of every custody change, where tests may kill luod.

Each multi-step change of what luod holds passes `reached(step)` between
its steps: after the intent is recorded, after each kernel call, after the
manifest commit, after the release. In production nothing listens (HOOK
stays None, one attribute test per step). The test entry points
(testsupport.crashhook) set HOOK to a function that kills luod with
SIGKILL at the Nth time a chosen step is reached, so that the fault
injection tests can prove each step crash-safe (issue 11).
"""

from __future__ import annotations

from collections.abc import Callable

# Set only by test entry points; never by luod itself.
HOOK: Callable[[str], None] | None = None

# Every step luod names, in the order a change passes them. The fault
# injection tests kill luod at each one.
STEPS: tuple[str, ...] = (
    # A new session (CreateSession, a hand-off with create, a delegated one).
    "create.kernel",  # the kernel session exists, not in the carrier yet
    "create.held",  # the carrier holds it, the manifest does not name it yet
    # A hand-off into a session.
    "handoff.intent",  # the intent is recorded, nothing preserved yet
    "handoff.preserved",  # the kernel holds the files, luod's references are not kept yet
    "handoff.kept",  # luod's references are kept (fd store), not committed
    "handoff.committed",  # the manifest names the files, no reply sent yet
    # Taking a file (RetrieveFd take=true): its session is rebuilt without it.
    "take.intent",
    "take.dropped",  # the old kernel session is let go of
    "take.represerved",  # the new kernel session holds the others
    "take.committed",  # the manifest no longer names the file, no reply sent yet
    "take.delivered",  # the reply went out, the end of the take not committed
    # Adopting a client's own session.
    "adopt.held",
    # Letting go (DiscardSession, the grace period, a session handed back).
    "release.committed",  # the manifest no longer names it, not released yet
    # At start: luod's references to a session's files taken back from the
    # carrier (the fd store's parking); after a restart they may be all
    # that holds the files of a session a change left half done.
    "reclaim.refs",
    # A restarted luod rebuilding a session a change left half done.
    "rebuild.dropped",  # the half-changed kernel session is let go of
    "rebuild.represerved",  # a new kernel session holds the manifest's files
    "rebuild.committed",  # the manifest names it, the old references not released
    # After a kexec: taking over, then carrying custody on.
    "reclaim.retrieved",  # every file retrieved, luod not ready yet
    "again.kept",  # the retrieved files are kept (fd store), not finished
    "again.finished",  # the incoming session is finished
    "again.represerved",  # the new outgoing session holds the files
    "again.committed",  # the manifest names the new session
)


def reached(step: str) -> None:
    if HOOK is not None:
        HOOK(step)
