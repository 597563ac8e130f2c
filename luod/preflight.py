"""The preflight check: what would be lost if the kexec happened now, and why.

Read-only over the ledger. KExec and Update refuse to jump while `check`
finds anything (unless forced); Check shows the same list. Sessions
that came over the last kexec are expected to have been preserved again
before this is asked (luod.custody does so first), else every one of them
would be reported. Whether the loaded next kernel can take the handover
at all (its command line, its LUO ABI) is luod.nextkernel's check; the
Manager's Check, Update and KExec add its problems to these.
"""

from __future__ import annotations

import dataclasses

from luod.ledger import Ledger
from luod.model import SessionState
from luod.record import record


@record
class Problem:
    """Something the next kexec would lose: which session and file, and why."""

    # The session concerned, "" for what concerns all of them.
    session: str
    # The file concerned, None for the whole session.
    name: str | None
    reason: str
    # The owner of the session concerned (None: all of them), so that a
    # non-root caller is shown only what concerns its own.
    uid: int | None = dataclasses.field(default=None, compare=False)


def check(ledger: Ledger) -> list[Problem]:
    problems: list[Problem] = []
    if ledger.manifest_error is not None:
        problems.append(
            Problem("", None, f"the incoming manifest is unusable: {ledger.manifest_error.message}")
        )
    not_carried: dict[str, str] = {}
    for p in ledger.carrier.problems():
        if p.kernel_name is None:  # not about one session: about all of them
            problems.append(Problem("", None, p.reason))
        else:
            not_carried[p.kernel_name] = p.reason
    for s in ledger.sessions.values():
        first = len(problems)
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
        for problem in problems[first:]:
            problem.uid = s.owner.uid
    return problems
