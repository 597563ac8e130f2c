"""luoctl's custody commands: hand fds and sessions to luod (push, adopt),
see them (list), get them back (retrieve, retrieve-session) and let them
go (discard, finish)."""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import stat
import sys
from typing import Any

from luod.cli.common import CliError, connect, format_bytes, inherited_fd, print_json, table


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
        fd = inherited_fd(args.fd)
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
    fd = inherited_fd(args.fd)
    with connect(args) as c:
        info = c.adopt_session(fd)
    if args.json:
        print_json(info)
    else:
        print(f"holding session {info['name']}")
    return 0


def _run_with_fds(fds: list[tuple[str, int]], argv: list[str]) -> int:
    """Run argv with `fds` as fds 3, 4, ..., announced the sd_listen_fds(3)
    way (LISTEN_FDS, LISTEN_FDNAMES)."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            # Above the targets first, so that moving one into place never
            # overwrites another that is still to be moved.
            moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(fds)) for _name, fd in fds]
            for i, fd in enumerate(moved):
                os.dup2(fd, 3 + i, inheritable=True)
            env = dict(
                os.environ,
                LISTEN_FDS=str(len(fds)),
                LISTEN_FDNAMES=":".join(name for name, _fd in fds),
                LISTEN_PID=str(os.getpid()),
            )
            os.execvpe(argv[0], argv, env)
        except OSError as e:
            print(f"luoctl: cannot run {argv[0]}: {e.strerror}", file=sys.stderr)
        os._exit(127)
    for _name, fd in fds:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _run_with_fd(fd: int, name: str, argv: list[str]) -> int:
    """Run argv with `fd` as fd 3, announced the sd_listen_fds(3) way."""
    return _run_with_fds([(name, fd)], argv)


def _copy_out(fd: int, out: Any) -> None:
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        out.write(chunk)
        offset += len(chunk)


def _open_output(path: str) -> tuple[int, bool]:
    """-o FILE for one fd, opened before luod is asked (a take cannot be
    undone) and not yet emptied (luod may refuse); whether luoctl made it."""
    made = not os.path.lexists(path)
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666), made
    except OSError as e:
        raise CliError(1, f"cannot write {path}: {e.strerror}") from None


def _not_written(args: argparse.Namespace, what: str, e: OSError) -> CliError:
    """luoctl could not write what luod gave it; with --take, luod let go."""
    lost = "; luod let go of the fds (--take): what was not written is lost" if args.take else ""
    return CliError(1, f"cannot write {what}: {e.strerror}{lost}")


def cmd_retrieve(args: argparse.Namespace) -> int:
    # -o is a file for one NAME, else a folder with a file per fd; stdout
    # takes one NAME only. Decided before luod is asked: a take cannot be
    # undone.
    one = len(args.names) == 1
    if not args.exec and not one:
        if args.output in (None, "-"):
            raise CliError(
                2,
                "retrieve: several fds (no NAME or more than one) go to a folder (-o DIR) "
                "or to a command (--exec)",
            )
        if not os.path.isdir(args.output):
            raise CliError(
                2, f"retrieve: {args.output} is not a folder (several fds: -o DIR, a file each)"
            )
    output, made = None, False
    if one and not args.exec and args.output not in (None, "-"):
        output, made = _open_output(args.output)
    try:
        with connect(args) as c:
            fds = c.retrieve_fds(args.session, args.names or None, take=args.take, owner=args.owner)
    except BaseException:
        if output is not None:
            os.close(output)
            if made:
                os.unlink(args.output)
        raise
    if args.exec:
        return _run_with_fds(fds, args.exec)
    try:
        if one:
            ((_name, fd),) = fds
            if output is None:
                _copy_out(fd, sys.stdout.buffer)
                return 0
            try:
                with open(output, "wb") as out:
                    if stat.S_ISREG(os.fstat(output).st_mode):
                        out.truncate(0)
                    _copy_out(fd, out)
            except OSError as e:
                raise _not_written(args, args.output, e) from None
            return 0
        for name, _fd in fds:
            if name in (".", ".."):
                raise CliError(1, f"retrieve: an fd named '{name}' cannot be a file: use --exec")
        for name, fd in fds:
            path = os.path.join(args.output, name)
            try:
                with open(path, "wb") as f:
                    _copy_out(fd, f)
            except OSError as e:
                raise _not_written(args, path, e) from None
        print(f"{len(fds)} fds of session '{args.session}' written to {args.output}")
    finally:
        for _name, fd in fds:
            os.close(fd)
    return 0


def cmd_retrieve_session(args: argparse.Namespace) -> int:
    with connect(args) as c:
        fd, session = c.retrieve_session_info(args.session, owner=args.owner)
    if args.exec:
        return _run_with_fd(fd, args.session, args.exec)
    os.close(fd)
    if session["state"] == "outgoing":
        # Before the kexec: a copy; luod still holds the session.
        print(
            f"session {args.session}: luod goes on holding it (carried over the kexec); "
            "without --exec this copy is closed now"
        )
    else:
        print(
            f"session {args.session} released by luod; without --exec it is closed "
            "(and finished) now"
        )
    return 0


def cmd_discard(args: argparse.Namespace) -> int:
    with connect(args) as c:
        c.discard_session(args.session, owner=args.owner)
    whose = "" if args.owner is None else f" of uid {args.owner}"
    print(f"session {args.session}{whose} released")
    return 0
