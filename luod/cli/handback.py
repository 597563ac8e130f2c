"""luoctl handback: an ExecStartPre= helper that puts a session's fds into
the calling service's own fd store (sd_notify FDSTORE=1), so that its main
process finds them in LISTEN_FDS without talking to luod."""

from __future__ import annotations

import argparse
import os
import sys

from luod import notify
from luod.cli.common import CliError, connect
from luod.client import MAX_FDS_PER_MESSAGE, VarlinkError

# How long luoctl handback waits for PID 1 to confirm (BARRIER=1) that it
# processed the FDSTORE=1 messages; generous for a loaded machine at boot,
# well inside the default TimeoutStartSec= of 90 s.
HANDBACK_BARRIER_TIMEOUT = 60.0


def _fd_store_max() -> int:
    """The unit's FileDescriptorStoreMax= ($FDSTORE, systemd >= 254), after
    checking that there is a service manager to push to at all."""
    needs = (
        "run it as ExecStartPre= of a unit with NotifyAccess=all (or exec) and an fd store "
        "(FileDescriptorStoreMax= at least the number of fds in the session)"
    )
    if not os.environ.get("NOTIFY_SOCKET"):
        raise CliError(1, f"handback: $NOTIFY_SOCKET is not set: {needs}")
    try:
        store_max = int(os.environ.get("FDSTORE", ""))
    except ValueError:
        store_max = 0
    if store_max <= 0:
        raise CliError(1, f"handback: the unit has no fd store ($FDSTORE is not set): {needs}")
    return store_max


def _batches(names: list[str]) -> list[list[str]]:
    """`names` in RetrieveFds calls of at most MAX_FDS_PER_MESSAGE each."""
    n = MAX_FDS_PER_MESSAGE
    return [names[i : i + n] for i in range(0, len(names), n)]


def cmd_handback(args: argparse.Namespace) -> int:
    """Push every fd of SESSION into the calling service's own fd store."""
    store_max = _fd_store_max()
    with connect(args) as c:
        try:
            session = c.list_sessions(args.session)[0]
        except VarlinkError as e:
            if e.short == "NoSuchSession" and args.optional:
                print(f"luoctl: {e}: nothing to hand back (--optional)", file=sys.stderr)
                return 0
            raise
        if session["kind"] != "managed":
            raise CliError(
                1,
                f"handback: session '{args.session}' is {session['kind']}: luod holds the "
                "session fd, not files in it (luoctl retrieve-session gives it back)",
            )
        names = [f["name"] for f in session["files"]]
        if len(names) > store_max:
            raise CliError(
                1,
                f"handback: session '{args.session}' holds {len(names)} fds, the fd store takes "
                f"{store_max} (FileDescriptorStoreMax=); nothing was handed back",
            )
        fds: list[tuple[str, int]] = []
        try:
            # Copies, in as few calls as replies carry them (all or nothing each).
            for part in _batches(names):
                fds += c.retrieve_fds(args.session, part)
            try:
                # One message per fd: FDNAME= names every fd of its message.
                for name, fd in fds:
                    notify.send(f"FDSTORE=1\nFDNAME={name}", [fd])
                confirmed = notify.barrier(HANDBACK_BARRIER_TIMEOUT)
            except OSError as e:
                raise CliError(
                    1, f"handback: cannot send to $NOTIFY_SOCKET: {e.strerror or e}"
                ) from None
            if not confirmed:
                raise CliError(
                    1,
                    f"handback: the service manager did not confirm the fds within "
                    f"{HANDBACK_BARRIER_TIMEOUT:.0f}s (BARRIER=1); luod keeps custody",
                )
            if args.take:
                # PID 1 holds every fd now: only then does custody end (the
                # session is preserved again once per call, not per fd).
                for part in _batches(names):
                    for _name, fd in c.retrieve_fds(args.session, part, take=True):
                        os.close(fd)
        finally:
            for _name, fd in fds:
                os.close(fd)
    how = "taken: luod let go of them" if args.take else "copies: luod keeps custody"
    listed = ", ".join(names) if names else "none"
    print(f"handed {len(names)} fds of session '{args.session}' to the fd store ({how}): {listed}")
    return 0
