"""luoctl: drive and inspect luod."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from luod import notify
from luod.client import Client, VarlinkError
from luod.protocol import DEFAULT_SOCKET

EPILOG = """\
examples:
  luoctl push cache index /var/lib/app/index.bin --create
                                 copy a file into a new memfd and hand it to luod
  luoctl push cache index --fd 3 hand off fd 3 (a memfd) as it is
  luoctl list                    what luod holds for you (root: for everyone)
  luoctl check                   what would be lost if the kexec happened now
  luoctl load /boot/vmlinuz --initrd /boot/initrd.img --reuse-cmdline
  luoctl status                  the loaded kernel, subscribers, what luod holds
  luoctl update                  prepare, freeze (subscribers acknowledge), kexec
  luoctl retrieve cache index -o /tmp/index.bin
  luoctl retrieve cache index --exec ./app
                                 run ./app with the fd as fd 3 (LISTEN_FDS=1)
  ExecStartPre=/usr/bin/luoctl handback cache --optional
                                 the unit's main process gets the session's fds
                                 from its own fd store (LISTEN_FDNAMES)

exit status: 0 success, 1 luod refused (the error is printed), 2 usage,
3 luod is not reachable.
"""


def _connect(args: argparse.Namespace) -> Client:
    try:
        return Client(args.socket)
    except OSError as e:
        raise CliError(3, f"cannot reach luod at {args.socket}: {e.strerror or e}") from None


class CliError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _time(usec: int | None) -> str:
    if usec is None:
        return "-"
    return datetime.datetime.fromtimestamp(usec / 1e6).strftime("%Y-%m-%d %H:%M:%S")


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _print_json(obj: Any) -> None:
    # One write: json.dump() writes token by token, which on an unbuffered
    # stdout (PYTHONUNBUFFERED=1) is a syscall per token: minutes for a
    # list of thousands of files written to a 9p share under TCG.
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# --- commands --------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        st = c.status()
        check = c.check()
    if args.json:
        _print_json({"status": st, "check": check})
        return 0
    print(f"luod {st['version']}  backend: {st['backend']}  carrier: {st['carrier']}")
    print(
        f"kexecs: {st['kexecCount']}  sessions: {st['sessions']}  files: {st['files']}  pinned: {_bytes(st['bytesPinned'])}"
    )
    rec = st.get("reclaim")
    if rec:
        line = f"reclaim: {rec['state']}, {rec['sessions']} sessions, {rec['files']} files in {rec['durationUSec'] / 1000:.1f} ms"
        again = rec.get("preservedAgainUSec")
        if rec["state"] == "reclaimed":
            line += (
                ", preserving them again for the next kexec"
                if again is None
                else f", preserved again in {again / 1000:.1f} ms"
            )
        if rec.get("lost"):
            line += f", lost: {', '.join(rec['lost'])}"
        if rec.get("error"):
            line += f", error: {rec['error']}"
        print(line)
    if st.get("nextReleaseUSec") is not None:
        print(
            f"unclaimed sessions are released at {_time(st['nextReleaseUSec'])} (grace {st['graceSec']}s)"
        )
    lk = st.get("loadedKernel")
    if lk:
        print(
            f"loaded kernel: {lk['kernel']}"
            + (f" initrd {lk['initrd']}" if lk.get("initrd") else "")
            + f", command line: {lk['commandLine']!r}"
        )
    else:
        print(
            "loaded kernel: "
            + ("yes (not loaded by luod)" if st["kernelLoaded"] else "none (luoctl load KERNEL)")
        )
    for sub in st.get("subscribers", []):
        owner = sub["owner"]
        print(
            f"subscriber {sub['name']}: {owner.get('unit') or owner.get('comm')} (uid {owner['uid']}), {sub['state']}, deadline {sub['deadlineSec']:g}s, last event {sub['lastEvent']}"
        )
    lu = st.get("lastUpdate")
    if lu:
        print(
            f"last update {lu['update']}: "
            + (
                "passed the barrier"
                if lu["ok"]
                else f"aborted by {lu['subscriber']}: {lu['reason']}"
            )
        )
    print(
        "ready for kexec: "
        + ("yes" if check["ready"] else f"no ({len(check['problems'])} problems, see luoctl check)")
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        sessions = c.list_sessions(args.session)
    if args.json:
        _print_json(sessions)
        return 0
    if not sessions:
        print("no sessions")
        return 0
    rows = []
    for s in sessions:
        owner = s["owner"]
        who = f"{owner.get('unit') or owner.get('comm') or '-'} ({owner['uid']})"
        rows.append(
            [
                s["name"],
                s["kind"],
                s["state"],
                who,
                str(len(s["files"])),
                _bytes(s["bytesPinned"]),
                s["kernelName"],
            ]
        )
        for f in s["files"]:
            rows.append(
                [f"  {f['name']}", "memfd", "", "", f"#{f['token']}", _bytes(f["size"]), ""]
            )
    print(_table(rows, ["SESSION", "KIND", "STATE", "OWNER", "FILES", "SIZE", "KERNEL NAME"]))
    return 0


def _memfd_from(path: str) -> int:
    fd = os.memfd_create(
        os.path.basename(path) if path != "-" else "stdin", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    )
    try:
        with open(fd, "wb", closefd=False) as out:
            if path == "-":
                shutil.copyfileobj(sys.stdin.buffer, out)
            else:
                with open(path, "rb") as src:
                    shutil.copyfileobj(src, out)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def cmd_push(args: argparse.Namespace) -> int:
    if (args.file is None) == (args.fd is None):
        raise CliError(2, "push needs either FILE (copied into a new memfd) or --fd N")
    if args.fd is not None:
        fd = args.fd
        owned = False
    else:
        try:
            fd = _memfd_from(args.file)
        except OSError as e:
            raise CliError(1, f"cannot read {args.file}: {e.strerror}") from None
        owned = True
    try:
        with _connect(args) as c:
            info = c.preserve_fd(args.session, args.name, fd, create_session=args.create)
    finally:
        if owned:
            os.close(fd)
    if args.json:
        _print_json(info)
    else:
        print(
            f"{args.session}/{info['name']}: preserved as token {info['token']}, {_bytes(info['size'])}"
        )
    return 0


def cmd_adopt(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        info = c.adopt_session(args.fd)
    if args.json:
        _print_json(info)
    else:
        print(f"holding session {info['name']}")
    return 0


def _run_with_fd(fd: int, name: str, argv: list[str]) -> int:
    """Run argv with `fd` as fd 3, announced the sd_listen_fds(3) way."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            if fd != 3:
                os.dup2(fd, 3, inheritable=True)
            else:
                os.set_inheritable(3, True)
            env = dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES=name, LISTEN_PID=str(os.getpid()))
            os.execvpe(argv[0], argv, env)
        except OSError as e:
            print(f"luoctl: cannot run {argv[0]}: {e.strerror}", file=sys.stderr)
        os._exit(127)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def cmd_retrieve(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        fd = c.retrieve_fd(args.session, args.name, take=args.take)
    if args.exec:
        return _run_with_fd(fd, args.name, args.exec)
    try:
        out: Any = sys.stdout.buffer if args.output in (None, "-") else open(args.output, "wb")  # noqa: SIM115
        try:
            offset = 0
            while chunk := os.pread(fd, 1 << 20, offset):
                out.write(chunk)
                offset += len(chunk)
        finally:
            if out is not sys.stdout.buffer:
                out.close()
    finally:
        os.close(fd)
    return 0


def cmd_retrieve_session(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        fd = c.retrieve_session(args.session)
    if args.exec:
        return _run_with_fd(fd, args.session, args.exec)
    os.close(fd)
    print(
        f"session {args.session} released by luod; without --exec it is closed (and finished) now"
    )
    return 0


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


def cmd_handback(args: argparse.Namespace) -> int:
    """Push every fd of SESSION into the calling service's own fd store."""
    store_max = _fd_store_max()
    with _connect(args) as c:
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
        fds: list[int] = []
        try:
            for name in names:
                fds.append(c.retrieve_fd(args.session, name))
            try:
                # One message per fd: FDNAME= names every fd of its message.
                for name, fd in zip(names, fds, strict=True):
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
                # PID 1 holds every fd now: only then does custody end.
                for name in names:
                    os.close(c.retrieve_fd(args.session, name, take=True))
        finally:
            for fd in fds:
                os.close(fd)
    how = "taken: luod let go of them" if args.take else "copies: luod keeps custody"
    listed = ", ".join(names) if names else "none"
    print(f"handed {len(names)} fds of session '{args.session}' to the fd store ({how}): {listed}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        res = c.check()
    if args.json:
        _print_json(res)
    elif res["ready"]:
        print("ready: nothing would be lost by a kexec now")
    else:
        for p in res["problems"]:
            where = p["session"] + (f"/{p['name']}" if p.get("name") else "")
            print(f"{where or 'luod'}: {p['reason']}")
    return 0 if res["ready"] else 1


def cmd_discard(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        c.discard_session(args.session)
    print(f"session {args.session} released")
    return 0


def cmd_reclaim(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        rec = c.reclaim()
    if args.json:
        _print_json(rec)
    else:
        print(
            f"reclaim {rec['state']}: {rec['sessions']} sessions, {rec['files']} files, {len(rec['lost'])} lost"
        )
        if rec.get("error"):
            print(f"error: {rec['error']}")
    return 1 if rec["state"] == "failed" else 0


def _load(c: Client, args: argparse.Namespace) -> None:
    loaded = c.load_kernel(
        os.path.abspath(args.kernel),
        os.path.abspath(args.initrd) if args.initrd else None,
        args.append,
        args.reuse_cmdline,
    )
    print(
        f"loaded {loaded['kernel']} with kexec_file_load, command line: {loaded['commandLine']!r}"
    )


def cmd_load(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        _load(c, args)
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        c.unload_kernel()
    print("unloaded")
    return 0


def _update(c: Client, force: bool) -> int:
    res = c.check()
    if not res["ready"] and not force:
        for p in res["problems"]:
            print(f"{p['session'] or 'luod'}: {p['reason']}", file=sys.stderr)
        raise CliError(
            1, "preflight check failed; nothing was started (use --force to go ahead anyway)"
        )
    try:
        out = c.update(force=force)
    except ConnectionError:
        # PID 1 stopped luod on its way into the kexec before luod replied.
        print("the live update is under way")
        return 0
    print(
        f"update {out['update']}: subscribers ready "
        f"(prepare {out['prepareUSec'] / 1000:.1f} ms, freeze {out['freezeUSec'] / 1000:.1f} ms); "
        "jumping into the next kernel"
    )
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        return _update(c, args.force)


def cmd_kexec(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        if args.kernel:
            _load(c, args)
        return _update(c, args.force)


def cmd_subscribe(args: argparse.Namespace) -> int:
    """Follow updates; with --ack answer prepare and freeze (tests, demos, scripts)."""
    with _connect(args) as c:
        acks: Client | None = _connect(args) if args.ack or args.refuse else None
        try:
            for ev in c.subscribe(args.name, args.deadline):
                if args.json:
                    print(json.dumps(ev, sort_keys=True), flush=True)
                else:
                    extra = ", ".join(
                        f"{k}={v}"
                        for k, v in ev.items()
                        if k not in ("phase", "subscription") and v is not None
                    )
                    print(f"{ev['phase']}" + (f" ({extra})" if extra else ""), flush=True)
                if acks is not None and ev["phase"] in ("prepare", "freeze"):
                    refuse = ev["phase"] == args.refuse
                    acks.acknowledge(
                        ev["subscription"],
                        ev["update"],
                        ev["phase"],
                        refuse,
                        args.reason if refuse else None,
                    )
        finally:
            if acks is not None:
                acks.close()
    return 0


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

    s = sub.add_parser(
        "status",
        help="what luod holds and whether a kexec now would lose anything",
        description="what luod holds and whether a kexec now would lose anything",
    )
    s.set_defaults(func=cmd_status)

    s = sub.add_parser(
        "list",
        help="sessions and their files (yours; root: everyone's)",
        description="sessions and their files (yours; root: everyone's)",
    )
    s.add_argument("session", nargs="?", help="only this session")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser(
        "push",
        help="hand a memfd (or a file's bytes, copied into one) to luod",
        description="hand a memfd (or a file's bytes, copied into one) to luod",
    )
    s.add_argument("session")
    s.add_argument("name", help="the fd's name in the session (a valid fd name)")
    s.add_argument("file", nargs="?", help="copy this file ('-' for stdin) into a new memfd")
    s.add_argument("--fd", type=int, help="hand off this inherited fd as it is (must be a memfd)")
    s.add_argument("--create", action="store_true", help="create the session if it does not exist")
    s.set_defaults(func=cmd_push)

    s = sub.add_parser(
        "adopt",
        help="hand over a LUO session fd you created yourself",
        description="hand over a LUO session fd you created yourself",
    )
    s.add_argument("--fd", type=int, required=True, help="the inherited session fd")
    s.set_defaults(func=cmd_adopt)

    s = sub.add_parser(
        "retrieve",
        help="get a held fd back (a copy, or --take it)",
        description="get a held fd back (a copy, or --take it)",
    )
    s.add_argument("session")
    s.add_argument("name")
    s.add_argument("-o", "--output", help="write the bytes here (default: stdout)")
    s.add_argument("--take", action="store_true", help="luod lets go of the fd")
    s.add_argument(
        "--exec",
        nargs=argparse.REMAINDER,
        metavar="CMD",
        help="run CMD with the fd as fd 3 (LISTEN_FDS)",
    )
    s.set_defaults(func=cmd_retrieve)

    s = sub.add_parser(
        "retrieve-session",
        help="take back a session you handed over whole",
        description="take back a session you handed over whole",
    )
    s.add_argument("session")
    s.add_argument(
        "--exec",
        nargs=argparse.REMAINDER,
        metavar="CMD",
        help="run CMD with the session fd as fd 3",
    )
    s.set_defaults(func=cmd_retrieve_session)

    s = sub.add_parser(
        "handback",
        help="ExecStartPre= helper: put a session's fds into the service's own fd store",
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
    s.set_defaults(func=cmd_handback)

    s = sub.add_parser(
        "check", help="preflight: what would be lost by a kexec now (exit 1 if anything)"
    )
    s.set_defaults(func=cmd_check)

    for name, helptext in (
        ("discard", "release a session before the kexec: it will not be carried"),
        ("finish", "after the kexec: you have what you need, release the session"),
    ):
        s = sub.add_parser(name, help=helptext, description=helptext)
        s.add_argument("session")
        s.set_defaults(func=cmd_discard)

    s = sub.add_parser(
        "reclaim", help="make luod take over what the last kernel carried (boot-time unit)"
    )
    s.set_defaults(func=cmd_reclaim)

    def kernel_args(s: argparse.ArgumentParser, required: bool) -> None:
        s.add_argument(
            "kernel",
            nargs=None if required else "?",
            help="kernel image (an x86 bzImage or arm64 Image)",
        )
        s.add_argument("--initrd")
        g = s.add_mutually_exclusive_group()
        g.add_argument("--append", help="the next kernel's command line")
        g.add_argument(
            "--reuse-cmdline", action="store_true", help="reuse this kernel's /proc/cmdline"
        )

    s = sub.add_parser(
        "load",
        help="check a kernel image and load it with kexec_file_load",
        description=(
            "Check KERNEL (readable, a kernel for this architecture) and load it with "
            "kexec_file_load(2) — never the old kexec_load(2), which carries no handover "
            "data, so every session would be lost."
        ),
    )
    kernel_args(s, required=True)
    s.set_defaults(func=cmd_load)

    s = sub.add_parser("unload", help="unload the kernel loaded for kexec")
    s.set_defaults(func=cmd_unload)

    update_help = (
        "The live update: luod's preflight check, then every subscriber is told prepare and "
        "freeze and must acknowledge within its deadline; a refusal, a timeout or a subscriber "
        "going away aborts it with nothing lost. Then the kexec: under systemd PID 1 does it "
        "(services stop, fd stores are carried), elsewhere luod calls reboot(LINUX_REBOOT_CMD_KEXEC)."
    )
    s = sub.add_parser(
        "update", help="start the live update into the loaded kernel", description=update_help
    )
    s.add_argument(
        "--force", action="store_true", help="go ahead even if the preflight check finds problems"
    )
    s.set_defaults(func=cmd_update)

    s = sub.add_parser(
        "kexec",
        help="load a kernel (kexec_file_load) and live-update into it: load + update",
        description="luoctl load KERNEL (checked, then loaded with kexec_file_load), then luoctl update. "
        + update_help,
    )
    kernel_args(s, required=False)
    s.add_argument(
        "--force", action="store_true", help="go ahead even if the preflight check finds problems"
    )
    s.set_defaults(func=cmd_kexec)

    s = sub.add_parser(
        "subscribe",
        help="follow live updates (prepare, freeze, aborted, resumed)",
        description="Subscribe to live updates as NAME and print each event. With --ack, acknowledge prepare and freeze; with --refuse PHASE, refuse that phase.",
    )
    s.add_argument("name")
    s.add_argument("--deadline", type=float, help="seconds to acknowledge each phase (default 30)")
    s.add_argument("--ack", action="store_true", help="acknowledge prepare and freeze")
    s.add_argument("--refuse", choices=("prepare", "freeze"), help="refuse this phase")
    s.add_argument(
        "--reason", default="refused by luoctl subscribe", help="the reason given with --refuse"
    )
    s.set_defaults(func=cmd_subscribe)
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


if __name__ == "__main__":
    sys.exit(main())
