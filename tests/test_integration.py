"""luod as a separate process, clients in other processes, real memfds over
the real socket, the fake kernel underneath, simulated kexecs."""

from __future__ import annotations

import errno
import fcntl
import multiprocessing
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from luod.client import Client, VarlinkError
from testsupport.fakekernel import FakeBackend
from testsupport.luodproc import LuodProcess, fake_backend_args, running_luod
from testsupport.util import make_memfd, memfd_facts, run_as, wait_until


def _status(luod: LuodProcess) -> dict[str, object]:
    with luod.client() as c:
        return c.status()


def test_handoff_kexec_retrieve_identical(luod: LuodProcess) -> None:
    payloads = {
        "small": (os.urandom(1024), 17, 0),
        "big": (os.urandom(8 << 20), 4 << 20, 0),
        "sealed": (os.urandom(4096), 0, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW),
    }
    before = {}
    with luod.client() as c:
        for name, (data, pos, seals) in payloads.items():
            fd = make_memfd(data, pos, seals)
            before[name] = memfd_facts(fd)
            info = c.preserve_fd("app", name, fd, create_session=True)
            os.close(fd)
            assert info["size"] == len(data)
    luod.kexec()
    with luod.client() as c:
        st = c.status()
        assert st["kexecCount"] == 1
        assert st["reclaim"]["state"] == "reclaimed"
        assert (st["reclaim"]["sessions"], st["reclaim"]["files"]) == (1, 3)
        for name in payloads:
            fd = c.retrieve_fd("app", name, take=True)
            assert memfd_facts(fd) == before[name]
            os.close(fd)
        # Everything taken: the session is finished and gone.
        assert c.list_sessions() == []
    assert "fd-taken" in luod.log()


def test_copy_keeps_custody_take_ends_it(luod: LuodProcess) -> None:
    fd = make_memfd(b"x" * 100)
    fd2 = make_memfd(b"y" * 200)
    with luod.client() as c:
        c.preserve_fds("s", [("a", fd), ("b", fd2)], create_session=True)
        copy = c.retrieve_fd("s", "a")
        assert memfd_facts(copy).size == 100
        os.close(copy)
        taken = c.retrieve_fd("s", "b", take=True)
        os.close(taken)
        files = [f["name"] for f in c.list_sessions("s")[0]["files"]]
        assert files == ["a"]
    os.close(fd)
    os.close(fd2)
    luod.kexec()
    with luod.client() as c:
        assert [f["name"] for f in c.list_sessions("s")[0]["files"]] == ["a"]
        with pytest.raises(VarlinkError) as e:
            c.retrieve_fd("s", "b")
        assert e.value.short == "NoSuchFd"


def test_custody_across_two_kexecs(luod: LuodProcess) -> None:
    data = os.urandom(300_000)
    fd = make_memfd(data, position=1234)
    want = memfd_facts(fd)
    with luod.client() as c:
        c.preserve_fd("keep", "blob", fd, create_session=True)
    os.close(fd)
    luod.kexec()
    luod.kexec()
    with luod.client() as c:
        st = c.status()
        assert st["kexecCount"] == 2
        got = c.retrieve_fd("keep", "blob")
        assert memfd_facts(got) == want
        os.close(got)
        assert c.list_sessions("keep")[0]["kexecCount"] == 2


def _client_creates_own_session(fake_kernel: str, luod_socket: str, data: bytes) -> None:
    kernel = FakeBackend(fake_kernel)
    sfd = kernel.create_session("client-own")
    mfd = make_memfd(data)
    kernel.preserve_fd(sfd, mfd, 7)
    with Client(luod_socket) as c:
        c.adopt_session(sfd)
    os.close(sfd)
    os.close(mfd)


def test_session_fd_handoff(luod: LuodProcess, fake_kernel: str) -> None:
    data = os.urandom(50_000)
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_client_creates_own_session, args=(fake_kernel, luod.socket, data))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    with luod.client() as c:
        (s,) = c.list_sessions()
        assert (s["name"], s["kind"], s["state"]) == ("client-own", "adopted", "outgoing")
    luod.kexec()
    kernel = FakeBackend(fake_kernel)
    with luod.client() as c:
        (s,) = c.list_sessions()
        assert s["state"] == "incoming"
        sfd = c.retrieve_session("client-own")
    mfd = kernel.retrieve_fd(sfd, 7)
    assert os.pread(mfd, len(data) + 1, 0) == data
    kernel.finish_session(sfd)
    os.close(mfd)
    os.close(sfd)
    with luod.client() as c:
        assert c.list_sessions() == []


def test_adopt_refuses_non_sessions_and_reserved(luod: LuodProcess, kernel: FakeBackend) -> None:
    r, w = os.pipe()
    with luod.client() as c:
        with pytest.raises(VarlinkError) as e:
            c.adopt_session(r)
        assert e.value.short == "UnsupportedFd"
        assert e.value.parameters["kind"] == "pipe"
        for name in ("systemd", "luod.x"):
            sfd = kernel.create_session(name)
            with pytest.raises(VarlinkError) as e:
                c.adopt_session(sfd)
            assert e.value.short == "ReservedSessionName"
            os.close(sfd)
        assert c.list_sessions() == []
    os.close(r)
    os.close(w)


def _unsupported_fds(tmp: Path) -> dict[str, tuple[int, str]]:
    r, w = os.pipe()
    os.close(w)
    a, b = socket.socketpair()
    b.close()
    reg = os.open(tmp / "regular", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    ev = os.eventfd(0, os.EFD_CLOEXEC)
    return {
        "pipe": (r, "pipe"),
        "socket": (a.detach(), "socket"),
        "regular": (reg, "regular-file"),
        "eventfd": (ev, "anon-inode"),
        "devnull": (os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC), "device"),
    }


def test_unsupported_fds_named_errors_change_nothing(luod: LuodProcess, workdir: Path) -> None:
    keep = make_memfd(b"keep")
    with luod.client() as c:
        c.preserve_fd("s", "keep", keep, create_session=True)
        before = c.list_sessions()
        for label, (fd, kind) in _unsupported_fds(workdir).items():
            with pytest.raises(VarlinkError) as e:
                c.preserve_fd("s", label, fd)
            assert e.value.error == "io.luod.Custody.UnsupportedFd", label
            assert e.value.parameters["kind"] == kind
            assert e.value.parameters["parameter"] == "fileDescriptor"
            # A new session is not created by a refused hand-off either.
            with pytest.raises(VarlinkError):
                c.preserve_fd("fresh", label, fd, create_session=True)
            os.close(fd)
        assert c.list_sessions() == before
    os.close(keep)


def test_batch_is_all_or_nothing(luod: LuodProcess, kernel: FakeBackend) -> None:
    good = make_memfd(b"good")
    busy = make_memfd(b"busy")
    # `busy` is preserved in another session already: only the kernel knows.
    other = kernel.create_session("other-agent")
    kernel.preserve_fd(other, busy, 1)
    with luod.client() as c:
        c.preserve_fd("s", "first", make_memfd(b"first"), create_session=True)
        before = c.list_sessions()
        with pytest.raises(VarlinkError) as e:
            c.preserve_fds("s", [("good", good), ("busy", busy)])
        assert e.value.short == "KernelRefused"
        assert e.value.parameters["errno"] == errno.EBUSY
        assert c.list_sessions()[0]["files"] == before[0]["files"]
        # The good memfd is not held: it can be handed off again.
        c.preserve_fd("s", "good", good)
    for fd in (good, busy, other):
        os.close(fd)


def test_bad_input_named_errors(luod: LuodProcess) -> None:
    fd = make_memfd(b"data")
    with luod.client() as c:
        cases: list[tuple[str, dict[str, Any], list[int], str]] = [
            ("io.luod.Custody.CreateSession", {"session": ""}, [], "InvalidName"),
            ("io.luod.Custody.CreateSession", {"session": "x" * 49}, [], "InvalidName"),
            ("io.luod.Custody.CreateSession", {"session": "has space"}, [], "InvalidName"),
            ("io.luod.Custody.CreateSession", {"session": "systemd"}, [], "ReservedSessionName"),
            ("io.luod.Custody.CreateSession", {"session": "luodx"}, [], "ReservedSessionName"),
            (
                "io.luod.Custody.PreserveFd",
                {"session": "nope", "name": "a", "fileDescriptor": 0},
                [fd],
                "NoSuchSession",
            ),
            (
                "io.luod.Custody.PreserveFd",
                {"session": "ok", "name": "a:b", "fileDescriptor": 0, "createSession": True},
                [fd],
                "InvalidName",
            ),
            (
                "io.luod.Custody.PreserveFd",
                {"session": "ok", "name": "a", "fileDescriptor": 1, "createSession": True},
                [fd],
                "MissingFd",
            ),
            (
                "io.luod.Custody.PreserveFd",
                {"session": "ok", "name": "a", "fileDescriptor": -1, "createSession": True},
                [fd],
                "MissingFd",
            ),
            (
                "io.luod.Custody.PreserveFd",
                {"session": "ok", "name": "a", "fileDescriptor": 0, "createSession": True},
                [],
                "MissingFd",
            ),
            ("io.luod.Custody.RetrieveFd", {"session": "nope", "name": "a"}, [], "NoSuchSession"),
            ("io.luod.Custody.DiscardSession", {"session": "nope"}, [], "NoSuchSession"),
            ("io.luod.Custody.RetrieveSession", {"session": "nope"}, [], "NoSuchSession"),
            ("io.luod.Custody.PreserveFd", {"session": "ok", "name": "a"}, [], "InvalidParameter"),
        ]
        for method, params, fds, error in cases:
            with pytest.raises(VarlinkError) as e:
                c.call(method, params, fds)
            assert e.value.short == error, (method, params, e.value.error)
        assert c.list_sessions() == []
        c.create_session("dup")
        with pytest.raises(VarlinkError) as e:
            c.create_session("dup")
        assert e.value.short == "SessionExists"
        c.preserve_fd("dup", "a", fd)
        with pytest.raises(VarlinkError) as e:
            c.preserve_fd("dup", "b", fd)
        assert e.value.short == "AlreadyPreserved"
        assert e.value.parameters == {"parameter": "fileDescriptor", "session": "dup", "name": "a"}
    os.close(fd)


def _intrude(socket_path: str, session: str) -> list[int | str]:
    """As uid 65534: what it sees, and what it is told of `session`."""
    results: list[int | str] = []
    with Client(socket_path) as c:
        results.append(len(c.list_sessions()))
        for call in (
            lambda: c.retrieve_fd(session, "a"),
            lambda: c.discard_session(session),
            lambda: c.list_sessions(session),
            lambda: c.preserve_fd(session, "b", make_memfd(b"intruder")),
        ):
            try:
                call()
                results.append("allowed")
            except VarlinkError as e:
                results.append(e.short)
        c.preserve_fd("nobodys", "x", make_memfd(b"mine"), create_session=True)
        results.append(len(c.list_sessions()))
        try:
            c.kexec()
            results.append("allowed")
        except VarlinkError as e:
            results.append(e.short)
    return results


def test_other_uid_is_denied(luod: LuodProcess) -> None:
    fd = make_memfd(b"root's")
    with luod.client() as c:
        c.preserve_fd("roots", "a", fd, create_session=True)
    os.close(fd)
    got = run_as(65534, lambda: _intrude(luod.socket, "roots"))
    assert got == [
        0,
        # Names are per owner: to nobody, root's session is no session.
        "NoSuchSession",
        "NoSuchSession",
        "NoSuchSession",
        "NoSuchSession",
        1,
        "RootRequired",
    ]
    with luod.client() as c:
        sessions = {s["name"]: s for s in c.list_sessions()}
        assert set(sessions) == {"roots", "nobodys"}
        assert sessions["nobodys"]["owner"]["uid"] == 65534
        assert [f["name"] for f in sessions["roots"]["files"]] == ["a"]


def test_no_fd_leak_after_1000_failing_calls(luod: LuodProcess, workdir: Path) -> None:
    with luod.client() as c:
        c.create_session("s")
        c.status()  # warm up lazily opened files
        baseline = luod.fd_count()
        fds = _unsupported_fds(workdir)
        for i in range(1000):
            fd, _kind = list(fds.values())[i % len(fds)]
            with pytest.raises(VarlinkError):
                if i % 4 == 3:
                    # An fd sent with a call that names another index.
                    c.call(
                        "io.luod.Custody.PreserveFd",
                        {"session": "s", "name": "n", "fileDescriptor": 5},
                        [fd],
                    )
                else:
                    c.preserve_fd("s", f"n{i}", fd)
        for fd, _kind in fds.values():
            os.close(fd)
        assert luod.fd_count() == baseline


def test_fds_dropped_at_the_open_file_limit_are_named(workdir: Path, fake_kernel: str) -> None:
    """At its RLIMIT_NOFILE the kernel installs what fits of a message's fds
    and drops the rest (MSG_CTRUNC): luod names that, not a client error,
    keeps nothing of the call and closes what did come."""
    limit = 200
    luod = LuodProcess(workdir, fake_backend_args(fake_kernel), [], nofile=limit)
    luod.start()
    try:
        fds = [make_memfd(b"x") for _ in range(253)]  # SCM_MAX_FD
        with luod.client() as c:
            c.status()  # warm up lazily opened files
            baseline = luod.fd_count()
            assert baseline + len(fds) > limit, baseline
            with pytest.raises(VarlinkError) as e:
                c.preserve_fds(
                    "s", [(f"f{i}", fd) for i, fd in enumerate(fds)], create_session=True
                )
            assert e.value.short == "TooManyOpenFiles", e.value
            index = e.value.parameters["index"]
            assert e.value.parameters == {
                "parameter": f"files[{index}].fileDescriptor",
                "index": index,
                "limit": limit,
            }
            assert 0 < index < len(fds)
            assert c.list_sessions() == []
            assert luod.fd_count() == baseline
            # What fits goes through.
            c.preserve_fds(
                "s", [(f"f{i}", fd) for i, fd in enumerate(fds[:10])], create_session=True
            )
        for fd in fds:
            os.close(fd)
        assert "error=io.luod.Custody.TooManyOpenFiles" in luod.log()
    finally:
        luod.stop()


def test_grace_period_releases_unclaimed(workdir: Path, fake_kernel: str) -> None:
    with running_luod(workdir, fake_kernel, "--grace=1s") as luod:
        with luod.client() as c:
            c.preserve_fd("claimed", "a", make_memfd(b"a"), create_session=True)
            c.preserve_fd("orphan", "b", make_memfd(b"b"), create_session=True)
        luod.kexec()
        with luod.client() as c:
            st = c.status()
            assert st["nextReleaseUSec"] is not None
            os.close(c.retrieve_fd("claimed", "a"))

        def released() -> bool:
            with luod.client() as c:
                return [s["name"] for s in c.list_sessions()] == ["claimed"]

        wait_until(released, "only 'claimed' left after the 1s grace")
        log = luod.log()
        assert "event=unclaimed-released session=orphan" in log
        assert "files=b" in log


def test_discard_before_kexec(luod: LuodProcess) -> None:
    with luod.client() as c:
        c.preserve_fd("gone", "a", make_memfd(b"a"), create_session=True)
        c.preserve_fd("kept", "a", make_memfd(b"a"), create_session=True)
        c.discard_session("gone")
    luod.kexec()
    with luod.client() as c:
        assert [s["name"] for s in c.list_sessions()] == ["kept"]


def test_check_reports_incoming_adopted_sessions(luod: LuodProcess, kernel: FakeBackend) -> None:
    sfd = kernel.create_session("mine")
    with luod.client() as c:
        c.adopt_session(sfd)
        assert c.check()["ready"] is True
    os.close(sfd)
    luod.kexec()
    with luod.client() as c:
        res = c.check()
        assert res["ready"] is False
        assert res["problems"][0]["session"] == "mine"
        assert "will be lost" in res["problems"][0]["reason"]


@pytest.mark.parametrize("kind", ["corrupt", "version"])
def test_unusable_incoming_manifest_releases_nothing(
    workdir: Path, fake_kernel: str, kind: str
) -> None:
    """A state session whose manifest is corrupt or of an unknown version:
    luod reports it, releases nothing, stays up."""
    from luod.carriers.slots import capacity_for, write_slot
    from testsupport import fakekernel as fake

    kernel = FakeBackend(fake_kernel)
    state = kernel.create_session("luod")
    memfd = os.memfd_create("manifest", os.MFD_CLOEXEC)
    size = capacity_for(100)
    os.ftruncate(memfd, size)
    if kind == "corrupt":
        os.pwrite(memfd, b"this is not a manifest", 0)
    else:
        write_slot(memfd, size, 0, 1, b'{"version": 99, "sessions": []}')
    kernel.preserve_fd(state, memfd, 1)
    other = kernel.create_session("luod.7.app")
    data = make_memfd(b"precious")
    kernel.preserve_fd(other, data, 1)
    fake.kexec(fake_kernel)
    for fd in (state, memfd, other, data):
        os.close(fd)
    with running_luod(workdir, fake_kernel) as luod:
        with luod.client() as c:
            st = c.status()
            assert st["reclaim"]["state"] == "failed"
            assert ("version 99" if kind == "version" else "corrupt") in st["reclaim"]["error"]
            assert c.check()["ready"] is False
            with pytest.raises(VarlinkError) as e:
                c.create_session("new")
            assert e.value.short == "NotReady"
        assert "event=manifest-unusable" in luod.log()
        assert "released=nothing" in luod.log()
    # Nothing was released: the other session can still be retrieved.
    snap = fake.snapshot(fake_kernel)
    assert "luod.7.app" in snap["incoming"]
    assert not snap["incoming"]["luod.7.app"]["retrieved"]


def test_kernel_backend_refuses_without_liveupdate(tmp_path: Path) -> None:
    import subprocess
    import sys

    if os.path.exists("/dev/liveupdate"):
        pytest.skip("this machine has /dev/liveupdate")
    r = subprocess.run(
        [sys.executable, "-m", "luod.daemon", f"--socket={tmp_path}/s"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1
    assert "CONFIG_LIVEUPDATE=y" in r.stderr
    assert "liveupdate=on" in r.stderr


def test_batch_of_253_fds_in_one_call(luod: LuodProcess) -> None:
    """SCM_MAX_FD memfds in one PreserveFds: the JSON is far longer than
    asyncvarlink's default 4 KiB peek, and no fd may get lost on the way."""
    fds = [make_memfd(f"file {i}".encode() * 10) for i in range(253)]
    with luod.client() as c:
        added = c.preserve_fds(
            "big-batch",
            [(f"a-rather-long-name-{i:04d}", fd) for i, fd in enumerate(fds)],
            create_session=True,
        )
        assert len(added) == 253
        got = c.retrieve_fd("big-batch", "a-rather-long-name-0252")
        assert os.pread(got, 100, 0) == b"file 252" * 10
        os.close(got)
    for fd in fds:
        os.close(fd)


def _cloexec_flags(pid: int) -> dict[int, bool]:
    """fd -> whether O_CLOEXEC is set, for every fd of process `pid`."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{name}") as f:
                flags = next(line for line in f if line.startswith("flags:"))
        except (FileNotFoundError, ProcessLookupError):
            continue  # closed since the listing (a connection luod let go of)
        out[int(name)] = bool(int(flags.split()[1], 8) & os.O_CLOEXEC)
    return out


def test_received_fds_are_cloexec(luod: LuodProcess) -> None:
    """Clients send fds without FD_CLOEXEC (varlinkctl does); every fd luod
    keeps must have it, or a child luod spawns (systemctl kexec) inherits it."""
    before = set(_cloexec_flags(luod.pid))
    fds = [make_memfd(b"x" * 10) for _ in range(3)]
    for fd in fds:
        os.set_inheritable(fd, True)
    with luod.client() as c:
        c.preserve_fds("cloexec", [(f"f{i}", fd) for i, fd in enumerate(fds)], create_session=True)
        sfd = c.create_delegated_session("cloexec-delegated")
        os.close(sfd)
        flags = _cloexec_flags(luod.pid)
    for fd in fds:
        os.close(fd)
    new = {fd: cloexec for fd, cloexec in flags.items() if fd not in before}
    # 3 memfds, at least one session fd each for the two sessions.
    assert len(new) >= 5
    assert all(new.values()), new
