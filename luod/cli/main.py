"""luoctl's command line: the parser of every command, and main(), which
runs one and turns what went wrong into a message and an exit status.

A new command is a `cmd_NAME(args) -> int` in the module of its concern
(custody, status, update, handback) and its lines in build_parser().
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from luod.cli.common import CliError
from luod.cli.custody import (
    cmd_adopt,
    cmd_discard,
    cmd_list,
    cmd_push,
    cmd_retrieve,
    cmd_retrieve_session,
)
from luod.cli.handback import cmd_handback
from luod.cli.status import cmd_check, cmd_reclaim, cmd_status
from luod.cli.update import cmd_kexec, cmd_load, cmd_subscribe, cmd_unload, cmd_update
from luod.client import VarlinkError
from luod.interfaces import DEFAULT_SOCKET

EPILOG = """\
examples:
  luoctl push cache index /var/lib/app/index.bin --create
                                 copy a file into a new memfd and hand it to luod
  luoctl push cache index --fd 3 hand off fd 3 (a memfd) as it is
  luoctl list                    what luod holds for you (root: for everyone)
  luoctl retrieve cache index --owner 1000 -o /tmp/index.bin
                                 root: a copy of uid 1000's file (names are per user)
  luoctl check                   what would be lost if the kexec happened now
  luoctl load /boot/vmlinuz --initrd /boot/initrd.img --reuse-cmdline
  luoctl status                  the loaded kernel, subscribers, what luod holds
  luoctl update                  prepare, freeze (subscribers acknowledge), kexec
  luoctl retrieve cache index -o /tmp/index.bin
  luoctl retrieve cache index --exec ./app
                                 run ./app with the fd as fd 3 (LISTEN_FDS=1)
  luoctl retrieve cache --exec ./app
                                 every fd of the session, in one call (LISTEN_FDNAMES)
  ExecStartPre=/usr/bin/luoctl handback cache --optional
                                 the unit's main process gets the session's fds
                                 from its own fd store (LISTEN_FDNAMES)

exit status: 0 success, 1 luod refused (the error is printed), 2 usage,
3 luod is not reachable.
"""

UPDATE_HELP = (
    "The live update: luod's preflight check, then every subscriber is told prepare and "
    "freeze and must acknowledge within its deadline; a refusal, a timeout or a subscriber "
    "going away aborts it with nothing lost, if that subscriber is root's or of a user luod's "
    "--update-veto names (anyone else's is logged, and the update goes on). With --force it "
    "goes on past every one of them, each logged. Then the kexec: under systemd PID 1 does it "
    "(services stop, fd stores are carried), elsewhere luod calls reboot(LINUX_REBOOT_CMD_KEXEC)."
)

Command = Callable[[argparse.Namespace], int]


def _command(
    sub: Any, name: str, func: Command, text: str, description: str | None = ""
) -> argparse.ArgumentParser:
    """The parser of `luoctl NAME`: `text` is its line in `luoctl --help`
    and, unless `description` says otherwise (None: nothing), the head of
    `luoctl NAME --help`."""
    s: argparse.ArgumentParser = sub.add_parser(
        name, help=text, description=text if description == "" else description
    )
    s.set_defaults(func=func)
    return s


def _exec_option(s: argparse.ArgumentParser, help: str) -> None:
    s.add_argument("--exec", nargs=argparse.REMAINDER, metavar="CMD", help=help)


def _kernel_args(s: argparse.ArgumentParser, required: bool) -> None:
    s.add_argument(
        "kernel",
        nargs=None if required else "?",
        help="kernel image (an x86 bzImage or arm64 Image), or a UKI (its .linux, .initrd, .cmdline)",
    )
    s.add_argument("--initrd", help="the initrd (instead of a UKI's .initrd)")
    g = s.add_mutually_exclusive_group()
    g.add_argument(
        "--append",
        help="the next kernel's command line (instead of a UKI's .cmdline); needs kho=on liveupdate=on",
    )
    g.add_argument("--reuse-cmdline", action="store_true", help="reuse this kernel's /proc/cmdline")


def _owner_option(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--owner",
        type=int,
        metavar="UID",
        help="root: the session of this uid (session names are per user; "
        "without --owner, your own)",
    )


def _seconds(text: str) -> float:
    """A number of seconds. NaN and infinity would go out as JSON's NaN and
    Infinity, which luod (as any JSON parser) refuses by closing the
    connection: luoctl would say luod closed it."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError("not a finite number of seconds")
    return value


def _force_option(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--force",
        action="store_true",
        help="go ahead even if the preflight check finds problems or a subscriber refuses",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="luoctl",
        description="Drive and inspect luod, which keeps file descriptors alive across a kexec.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--socket",
        default=os.environ.get("LUOD_SOCKET", DEFAULT_SOCKET),
        help=f"luod's varlink socket (default: $LUOD_SOCKET or {DEFAULT_SOCKET})",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _command(
        sub,
        "status",
        cmd_status,
        "what luod holds, whether a kexec now would lose anything, what a crash of luod would",
    )

    s = _command(sub, "list", cmd_list, "sessions and their files (yours; root: everyone's)")
    s.add_argument("session", nargs="?", help="only this session")
    _owner_option(s)

    s = _command(sub, "push", cmd_push, "hand a memfd (or a file's bytes, copied into one) to luod")
    s.add_argument("session")
    s.add_argument("name", help="the fd's name in the session (a valid fd name)")
    s.add_argument("file", nargs="?", help="copy this file ('-' for stdin) into a new memfd")
    s.add_argument("--fd", type=int, help="hand off this inherited fd as it is (must be a memfd)")
    s.add_argument("--create", action="store_true", help="create the session if it does not exist")

    s = _command(sub, "adopt", cmd_adopt, "hand over a LUO session fd you created yourself")
    s.add_argument("--fd", type=int, required=True, help="the inherited session fd")

    s = _command(
        sub,
        "retrieve",
        cmd_retrieve,
        "get held fds back (copies, or --take them)",
        description=(
            "Get the fds NAME... of SESSION back from luod in one call, or without NAME every "
            "fd of the session: all or none (at most 253 per call). One NAME: its bytes go to "
            "stdout or -o FILE. Several: -o DIR (a file per fd, named as in luod) or --exec."
        ),
    )
    s.add_argument("session")
    s.add_argument(
        "names", nargs="*", metavar="NAME", help="the fds to get back (default: every fd)"
    )
    s.add_argument(
        "-o",
        "--output",
        help="write the bytes here (default: stdout); with no or several NAMEs, a folder",
    )
    s.add_argument("--take", action="store_true", help="luod lets go of the fds")
    _owner_option(s)
    _exec_option(s, "run CMD with the fds as fds 3, 4, ... (LISTEN_FDS, LISTEN_FDNAMES)")

    s = _command(
        sub, "retrieve-session", cmd_retrieve_session, "take back a session you handed over whole"
    )
    s.add_argument("session")
    _owner_option(s)
    _exec_option(s, "run CMD with the session fd as fd 3")

    s = _command(
        sub,
        "handback",
        cmd_handback,
        "ExecStartPre= helper: put a session's fds into the service's own fd store",
        description=(
            "Retrieve every fd of SESSION from luod and push each into the calling service's "
            "fd store (sd_notify FDSTORE=1, FDNAME=<its name in luod>), so that the service's "
            "main process finds them in LISTEN_FDS/LISTEN_FDNAMES without calling luod. For "
            "ExecStartPre= of a unit with NotifyAccess=all (or exec), FileDescriptorStoreMax=N, "
            "Wants=/After=luod-reclaim.service. Copies by default: luod keeps custody."
        ),
    )
    s.add_argument("session")
    s.add_argument(
        "--take",
        action="store_true",
        help="luod lets go of the fds once the service manager holds them",
    )
    s.add_argument(
        "--optional",
        action="store_true",
        help="a session that does not exist (yet) is not an error: nothing to hand back",
    )

    _command(
        sub,
        "check",
        cmd_check,
        "preflight: what would be lost by a kexec now (exit 1 if anything), "
        "and what a crash of luod now would release",
        description=None,
    )

    for name, text in (
        ("discard", "release a session before the kexec: it will not be carried"),
        ("finish", "after the kexec: you have what you need, release the session"),
    ):
        s = _command(sub, name, cmd_discard, text)
        s.add_argument("session")
        _owner_option(s)

    _command(
        sub,
        "reclaim",
        cmd_reclaim,
        "make luod take over what the last kernel carried (boot-time unit)",
        description=None,
    )

    s = _command(
        sub,
        "load",
        cmd_load,
        "check a kernel image and load it with kexec_file_load",
        description=(
            "Check KERNEL (readable, a kernel for this architecture, or a UKI split as "
            "systemctl kexec does) and whether it can take the handover (kho=on and "
            "liveupdate=on on its command line, the running kernel's LUO ABI and memfd "
            "handler in its image), then load it with kexec_file_load(2) — never the old "
            "kexec_load(2), which carries no handover data, so every session would be lost."
        ),
    )
    _kernel_args(s, required=True)
    s.add_argument(
        "--force",
        action="store_true",
        help="load it even if it cannot take the handover (everything luod holds would be lost)",
    )

    _command(sub, "unload", cmd_unload, "unload the kernel loaded for kexec", description=None)

    s = _command(
        sub,
        "update",
        cmd_update,
        "start the live update into the loaded kernel",
        description=UPDATE_HELP,
    )
    _force_option(s)

    s = _command(
        sub,
        "kexec",
        cmd_kexec,
        "load a kernel (kexec_file_load) and live-update into it: load + update",
        description="luoctl load KERNEL (checked, then loaded with kexec_file_load), then luoctl update. "
        + UPDATE_HELP,
    )
    _kernel_args(s, required=False)
    _force_option(s)

    s = _command(
        sub,
        "subscribe",
        cmd_subscribe,
        "follow live updates (prepare, freeze, aborted, resumed)",
        description="Subscribe to live updates as NAME (names are per user) and print each event. With --ack, acknowledge prepare and freeze; with --refuse PHASE, refuse that phase: that stops the update only for root's subscribers and those of users luod's --update-veto names.",
    )
    s.add_argument("name")
    s.add_argument(
        "--deadline", type=_seconds, help="seconds to acknowledge each phase (default 30)"
    )
    s.add_argument("--ack", action="store_true", help="acknowledge prepare and freeze")
    s.add_argument("--refuse", choices=("prepare", "freeze"), help="refuse this phase")
    s.add_argument(
        "--reason", default="refused by luoctl subscribe", help="the reason given with --refuse"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except CliError as e:
        print(f"luoctl: {e.message}", file=sys.stderr)
        return e.code
    except VarlinkError as e:
        print(f"luoctl: {e}", file=sys.stderr)
        return 1
    except ConnectionError as e:
        print(f"luoctl: {e}", file=sys.stderr)
        return 3
