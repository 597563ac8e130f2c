"""luoctl's custody commands: hand fds and sessions to luod (push, adopt),
see them (list), get them back (retrieve, retrieve-session) and let them
go (discard, finish)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Any

from luod.cli.common import CliError, connect, format_bytes, print_json, table


def cmd_list(args: argparse.Namespace) -> int:
    with connect(args) as c:
        sessions = c.list_sessions(args.session, owner=args.owner)
    if args.json:
        print_json(sessions)
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
                format_bytes(s["bytesPinned"]),
                s["kernelName"],
            ]
        )
        for f in s["files"]:
            rows.append(
                [f"  {f['name']}", "memfd", "", "", f"#{f['token']}", format_bytes(f["size"]), ""]
            )
    print(table(rows, ["SESSION", "KIND", "STATE", "OWNER", "FILES", "SIZE", "KERNEL NAME"]))
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
        with connect(args) as c:
            info = c.preserve_fd(args.session, args.name, fd, create_session=args.create)
    finally:
        if owned:
            os.close(fd)
    if args.json:
        print_json(info)
    else:
        print(
            f"{args.session}/{info['name']}: preserved as token {info['token']}, {format_bytes(info['size'])}"
        )
    return 0


def cmd_adopt(args: argparse.Namespace) -> int:
    with connect(args) as c:
        info = c.adopt_session(args.fd)
    if args.json:
        print_json(info)
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
    with connect(args) as c:
        fd = c.retrieve_fd(args.session, args.name, take=args.take, owner=args.owner)
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
    with connect(args) as c:
        fd = c.retrieve_session(args.session, owner=args.owner)
    if args.exec:
        return _run_with_fd(fd, args.session, args.exec)
    os.close(fd)
    print(
        f"session {args.session} released by luod; without --exec it is closed (and finished) now"
    )
    return 0


def cmd_discard(args: argparse.Namespace) -> int:
    with connect(args) as c:
        c.discard_session(args.session, owner=args.owner)
    whose = "" if args.owner is None else f" of uid {args.owner}"
    print(f"session {args.session}{whose} released")
    return 0
