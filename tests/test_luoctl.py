"""luoctl end to end against a luod process on the fake kernel."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from testsupport.luodproc import LuodProcess


def luoctl(
    luod: LuodProcess, *args: str, stdin: bytes | None = None, pass_fds: tuple[int, ...] = ()
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "luod.cli", f"--socket={luod.socket}", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        pass_fds=pass_fds,
    )


def test_help_is_worth_reading() -> None:
    r = subprocess.run([sys.executable, "-m", "luod.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for word in ("push", "retrieve", "kexec", "check", "reclaim", "examples:", "exit status"):
        assert word in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "luod.cli", "kexec", "--help"], capture_output=True, text=True
    )
    assert "kexec_file_load" in r.stdout


def test_push_list_retrieve_roundtrip(luod: LuodProcess, workdir: Path) -> None:
    src = workdir / "in.bin"
    src.write_bytes(os.urandom(123_456))
    r = luoctl(luod, "push", "app", "state", str(src), "--create")
    assert r.returncode == 0, r.stderr
    assert b"preserved as token 1" in r.stdout
    r = luoctl(luod, "list")
    assert b"app" in r.stdout and b"state" in r.stdout and b"120.6 KiB" in r.stdout
    r = luoctl(luod, "--json", "list")
    assert json.loads(r.stdout)[0]["files"][0]["size"] == 123_456
    luod.kexec()
    out = workdir / "out.bin"
    r = luoctl(luod, "retrieve", "app", "state", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == src.read_bytes()
    r = luoctl(
        luod,
        "retrieve",
        "app",
        "state",
        "--take",
        "--exec",
        "sh",
        "-c",
        'test "$LISTEN_FDNAMES" = state && sha256sum <&3',
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0].decode() == hashlib.sha256(src.read_bytes()).hexdigest()
    r = luoctl(luod, "list")
    assert r.stdout == b"no sessions\n"


def test_retrieve_several_in_one_call(luod: LuodProcess, workdir: Path) -> None:
    for name, data in (("a", b"alpha"), ("b", b"beta")):
        src = workdir / name
        src.write_bytes(data)
        r = luoctl(luod, "push", "app", name, str(src), "--create")
        assert r.returncode == 0, r.stderr
    # Several fds do not go to stdout; refused before luod is asked.
    r = luoctl(luod, "retrieve", "app")
    assert r.returncode == 2 and b"-o DIR" in r.stderr, r.stderr
    r = luoctl(luod, "retrieve", "app", "a", "b", "-o", str(workdir / "a"))
    assert r.returncode == 2 and b"is not a folder" in r.stderr, r.stderr
    out = workdir / "out"
    out.mkdir()
    r = luoctl(luod, "retrieve", "app", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {"a": b"alpha", "b": b"beta"}
    # Every fd of the session, taken, to a command: fds 3 and 4, named.
    r = luoctl(
        luod,
        "retrieve",
        "app",
        "b",
        "a",
        "--take",
        "--exec",
        "sh",
        "-c",
        'echo "$LISTEN_FDS $LISTEN_FDNAMES"; cat <&3; echo; cat <&4',
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"2 b:a\nbeta\nalpha"
    assert luoctl(luod, "list").stdout == b"no sessions\n"


def test_errors_and_exit_codes(luod: LuodProcess, workdir: Path) -> None:
    r = luoctl(luod, "retrieve", "nope", "x")
    assert r.returncode == 1
    assert r.stderr == b"luoctl: no session named 'nope'\n"
    r = luoctl(luod, "push", "s", "p", "--fd", "0", "--create", stdin=b"")
    assert r.returncode == 1
    assert b"the kernel can only preserve memfds" in r.stderr
    r = luoctl(luod, "push", "s", "p")
    assert r.returncode == 2
    r = subprocess.run(
        [sys.executable, "-m", "luod.cli", f"--socket={workdir}/absent", "status"],
        capture_output=True,
    )
    assert r.returncode == 3
    assert b"cannot reach luod" in r.stderr


def test_status_and_check(luod: LuodProcess) -> None:
    r = luoctl(luod, "status")
    assert r.returncode == 0
    assert b"backend: fake" in r.stdout and b"ready for kexec: yes" in r.stdout
    r = luoctl(luod, "check")
    assert r.returncode == 0
    assert b"ready" in r.stdout


def test_an_fd_that_is_not_open_is_a_usage_error(luod: LuodProcess) -> None:
    """--fd of an fd luoctl did not inherit was a Python traceback (EBADF
    from sendmsg)."""
    for args in (("push", "s", "f", "--fd", "99", "--create"), ("adopt", "--fd", "99")):
        r = luoctl(luod, *args)
        assert r.returncode == 2, r.stderr
        assert r.stderr == b"luoctl: --fd 99: not an open file descriptor\n"


def test_retrieve_to_a_file_it_cannot_write_asks_luod_nothing(
    luod: LuodProcess, workdir: Path
) -> None:
    """-o FILE was opened only once luod had answered: a path that cannot
    be written was a traceback, and with --take the fd was lost (luod had
    let go of it, luoctl could not write it)."""
    src = workdir / "in.bin"
    src.write_bytes(b"keep me")
    assert luoctl(luod, "push", "app", "state", str(src), "--create").returncode == 0
    r = luoctl(luod, "retrieve", "app", "state", "--take", "-o", str(workdir / "absent" / "out"))
    assert r.returncode == 1, r.stderr
    assert (
        r.stderr
        == f"luoctl: cannot write {workdir}/absent/out: No such file or directory\n".encode()
    )
    # Still held; a file that exists is not touched when luod refuses.
    out = workdir / "out.bin"
    out.write_bytes(b"before")
    r = luoctl(luod, "retrieve", "app", "nope", "-o", str(out))
    assert r.returncode == 1 and b"holds no fd named 'nope'" in r.stderr, r.stderr
    assert out.read_bytes() == b"before"
    r = luoctl(luod, "retrieve", "app", "state", "--take", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == b"keep me"
    # A file luoctl made for a refused call is not left behind.
    made = workdir / "made.bin"
    assert luoctl(luod, "retrieve", "app", "state", "-o", str(made)).returncode == 1
    assert not made.exists()


def test_retrieve_says_what_it_could_not_write(luod: LuodProcess, workdir: Path) -> None:
    """A file of -o DIR that cannot be written was a traceback; with --take
    luoctl says that what it did not write is lost."""
    src = workdir / "in.bin"
    src.write_bytes(b"data")
    assert luoctl(luod, "push", "app", "a", str(src), "--create").returncode == 0
    out = workdir / "out"
    (out / "a").mkdir(parents=True)
    r = luoctl(luod, "retrieve", "app", "-o", str(out))
    assert r.returncode == 1, r.stderr
    assert r.stderr == f"luoctl: cannot write {out}/a: Is a directory\n".encode()
    r = luoctl(luod, "retrieve", "app", "--take", "-o", str(out))
    assert r.returncode == 1, r.stderr
    assert (
        r.stderr
        == (
            f"luoctl: cannot write {out}/a: Is a directory; luod let go of the fds (--take): "
            "what was not written is lost\n"
        ).encode()
    )


def test_a_deadline_that_is_no_number_is_a_usage_error(luod: LuodProcess) -> None:
    """NaN and infinity went out as JSON's NaN and Infinity, which no JSON
    parser takes: luod closed the connection, and luoctl said so with the
    exit status of luod not reachable."""
    for value in ("nan", "inf", "-inf"):
        r = luoctl(luod, "subscribe", "x", f"--deadline={value}")
        assert r.returncode == 2, r.stderr
        assert b"--deadline: not a finite number of seconds" in r.stderr, r.stderr


def test_retrieve_session_says_whether_luod_still_holds_it(luod: LuodProcess) -> None:
    """Before the kexec RetrieveSession gives a copy and luod goes on
    holding the session; luoctl said it was released by luod and finished."""
    with luod.client() as c:
        os.close(c.create_delegated_session("d"))
    r = luoctl(luod, "retrieve-session", "d")
    assert r.returncode == 0, r.stderr
    assert r.stdout == (
        b"session d: luod goes on holding it (carried over the kexec); "
        b"without --exec this copy is closed now\n"
    )
    with luod.client() as c:
        assert [s["name"] for s in c.list_sessions()] == ["d"]
    luod.kexec()
    r = luoctl(luod, "retrieve-session", "d")
    assert r.returncode == 0, r.stderr
    assert r.stdout == (
        b"session d released by luod; without --exec it is closed (and finished) now\n"
    )
    assert luoctl(luod, "list").stdout == b"no sessions\n"
