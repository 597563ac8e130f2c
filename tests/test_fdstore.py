"""The fd store carrier: luod under a fake service manager
(testsupport.fakepid1.FakePid1, systemd >= 261 for one service), restarted
in the same boot, carried over a (fake) kexec by PID 1, socket-activated,
and refusing what a service manager that drops the store would lose.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from luod import servicemanager
from luod.carriers.fdstore import fdname_for
from luod.carriers.slots import capacity_for, write_slot
from luod.client import Client, VarlinkError
from luod.kernel.backend import LuoError
from testsupport.fakekernel import FakeBackend
from testsupport.fakepid1 import FakePid1
from testsupport.images import fake_bzimage
from testsupport.util import make_memfd, memfd_facts, run_as, wait_until

# --- helpers ------------------------------------------------------------------


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def luod_files(pid: int) -> list[tuple[int, int] | None]:
    """The file behind every fd of process `pid`."""
    return [_inode(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")]


def settled_fd_count(pid1: FakePid1) -> int:
    """luod's fd count once it stayed the same for 0.3s: right after
    READY=1, luod may still be closing the socket it sent that with."""
    last, since = -1, time.monotonic()
    deadline = since + 5
    while time.monotonic() < deadline:
        n = len(luod_files(pid1.pid))
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= 0.3:
            break
        time.sleep(0.02)
    return last


def wait_fd_count(pid1: FakePid1, want: int) -> int:
    """luod's fd count once it reaches `want` (a client connection it is
    still closing may linger for a moment), or what it is after 5s."""
    deadline = time.monotonic() + 5
    while True:
        have = len(luod_files(pid1.pid))
        if have == want or time.monotonic() > deadline:
            return have
        time.sleep(0.05)


def assert_store_held_once(pid1: FakePid1) -> None:
    """Every store entry is in luod exactly once: nothing duplicated, and
    nothing from LISTEN_FDS forgotten."""
    entries = pid1.entries()
    files = luod_files(pid1.pid)
    for e in entries:
        assert files.count(_inode(f"/proc/self/fd/{e.fd}")) == 1, e.name


def _hand_off(c: Client, data: dict[str, bytes]) -> dict[str, Any]:
    facts = {}
    for key, payload in data.items():
        session, name = key.split("/")
        fd = make_memfd(payload, position=len(payload) // 3)
        facts[key] = memfd_facts(fd)
        c.preserve_fd(session, name, fd, create_session=True)
        os.close(fd)
    return facts


def _adopt_client_session(pid1: FakePid1, c: Client, payload: bytes) -> None:
    sfd = pid1.kernel.create_session("client-own")
    mfd = make_memfd(payload)
    pid1.kernel.preserve_fd(sfd, mfd, 7)
    c.adopt_session(sfd)
    os.close(sfd)
    os.close(mfd)


def _listing(c: Client) -> list[tuple[str, str, str, list[tuple[str, int, int]]]]:
    return [
        (
            s["name"],
            s["kind"],
            s["state"],
            [(f["name"], f["token"], f["size"]) for f in s["files"]],
        )
        for s in c.list_sessions()
    ]


# --- luod restarted in the same boot --------------------------------------------


def test_kill9_restart_loses_nothing(pid1: FakePid1) -> None:
    pid1.start()
    assert "event=carrier-chosen carrier=fdstore" in pid1.log()
    assert "event=service-manager-carries-fdstore version=262.1-1" in pid1.log()
    # What luod needs anyway: all it holds at first is the manifest.
    infra = settled_fd_count(pid1) - 1
    data = {"app/a": os.urandom(100_000), "app/b": os.urandom(5000), "db/x": os.urandom(70_000)}
    with pid1.client() as c:
        facts = _hand_off(c, data)
        _adopt_client_session(pid1, c, b"client bytes")
        before = _listing(c)
        assert c.status()["carrier"].startswith("fd store: manifest 'luod-manifest-a'")
    store = pid1.names()
    # luod's own references to the files are kept too, parked in a socket
    # pair per session (both ends), and the journal of changes (issue 11).
    assert store == [
        "luod-journal",
        "luod-manifest-a",
        "refs.luod.1.u0.app",
        "refs.luod.1.u0.app",
        "refs.luod.2.u0.db",
        "refs.luod.2.u0.db",
        "session.client-own",
        "session.luod.1.u0.app",
        "session.luod.2.u0.db",
    ]
    pid1.kill9()
    # The store kept every session open: the kernel still has them.
    outgoing = pid1.kernel.snapshot()["outgoing"]
    assert outgoing["luod.1.u0.app"]["tokens"] == [1, 2]
    assert outgoing["client-own"]["tokens"] == [7]

    pid1.start()
    with pid1.client() as c:
        assert _listing(c) == before
        st = c.status()
        assert st["reclaim"]["state"] == "restored"
        assert (st["reclaim"]["sessions"], st["reclaim"]["files"], st["reclaim"]["lost"]) == (
            3,
            3,
            [],
        )
        assert st["kexecCount"] == 0
        check = c.check()
        assert (check["ready"], check["problems"], check["crashCost"]["sessions"]) == (True, [], 0)
    assert pid1.names() == store
    assert "event=session-restored session=app kind=managed state=outgoing" in pid1.log()
    assert_store_held_once(pid1)
    # The store's entries and luod's references to the three files (taken
    # back from their parkings), nothing else.
    assert wait_fd_count(pid1, infra + len(store) + 3) == infra + len(store) + 3
    with pid1.client() as c:
        # Every file is there at once: luod took its references back from
        # the store (issue 11: it used to answer NotReady until the kexec).
        for key, want in facts.items():
            session, name = key.split("/")
            fd = c.retrieve_fd(session, name)
            assert memfd_facts(fd) == want
            os.close(fd)

    pid1.kexec()
    pid1.start()
    with pid1.client() as c:
        assert c.status()["reclaim"]["state"] == "reclaimed"
        for key, want in facts.items():
            session, name = key.split("/")
            fd = c.retrieve_fd(session, name)
            assert memfd_facts(fd) == want
            os.close(fd)
        sfd = c.retrieve_session("client-own")
    mfd = pid1.kernel.retrieve_fd(sfd, 7)
    assert os.pread(mfd, 100, 0) == b"client bytes"
    os.close(mfd)
    os.close(sfd)


def test_hand_off_after_restart(pid1: FakePid1) -> None:
    pid1.start()
    with pid1.client() as c:
        c.preserve_fd("s", "old", make_memfd(b"old"), create_session=True)
    pid1.kill9()
    pid1.start()
    with pid1.client() as c:
        # Batches, copies and takes work as before the restart: luod has its
        # references back (issue 11: all three were NotReady until the kexec).
        c.preserve_fds("s", [("n1", make_memfd(b"1")), ("n2", make_memfd(b"2"))])
        c.preserve_fd("s", "new", make_memfd(b"new"))
        copy = c.retrieve_fd("s", "old")
        assert os.pread(copy, 10, 0) == b"old"
        os.close(copy)
        taken = c.retrieve_fd("s", "n1", take=True)
        assert os.pread(taken, 10, 0) == b"1"
        os.close(taken)
        assert c.check()["ready"] is True
    pid1.kexec()
    pid1.start()
    with pid1.client() as c:
        for name, want in (("old", b"old"), ("n2", b"2"), ("new", b"new")):
            fd = c.retrieve_fd("s", name, take=True)
            assert os.pread(fd, 10, 0) == want
            os.close(fd)
        assert c.list_sessions() == []


# --- across the kexec, carried by PID 1 ---------------------------------------------


def test_kexec_through_pid1_reclaims_identical(pid1: FakePid1) -> None:
    pid1.start()
    infra = settled_fd_count(pid1) - 1  # all it holds at first is the manifest
    data = {
        "app/big": os.urandom(3 << 20),
        "app/small": os.urandom(10),
        "cache/idx": os.urandom(40_000),
    }
    with pid1.client() as c:
        facts = _hand_off(c, data)
        _adopt_client_session(pid1, c, b"adopted")
    pid1.kexec()
    # PID 1 gave back what luod had stored, by the same names. luod's file
    # references were in luod's sessions: PID 1 could not preserve them too
    # (EBUSY) and went on without them.
    assert pid1.names() == [
        "luod-journal",
        "luod-manifest-a",
        "session.client-own",
        "session.luod.1.u0.app",
        "session.luod.2.u0.cache",
    ]
    pid1.start()
    with pid1.client() as c:
        st = c.status()
        assert st["kexecCount"] == 1
        assert st["reclaim"]["state"] == "reclaimed"
        assert (st["reclaim"]["sessions"], st["reclaim"]["files"]) == (3, 3)
        for key, want in facts.items():
            session, name = key.split("/")
            fd = c.retrieve_fd(session, name)
            assert memfd_facts(fd) == want
            os.close(fd)
        sessions = {s["name"]: s for s in c.list_sessions()}
        assert sessions["client-own"]["state"] == "incoming"
        deadline = sessions["client-own"]["claimDeadlineUSec"]
    # The incoming sessions were taken over into new ones; their entries
    # went. luod's file references went into the store before FINISH.
    assert pid1.names() == [
        "luod-journal",
        "luod-manifest-a",
        "refs.luod.3.u0.app",
        "refs.luod.3.u0.app",
        "refs.luod.4.u0.cache",
        "refs.luod.4.u0.cache",
        "session.client-own",
        "session.luod.3.u0.app",
        "session.luod.4.u0.cache",
    ]
    snap = pid1.kernel.snapshot()
    assert sorted(snap["incoming"]) == ["client-own"]
    assert sorted(snap["outgoing"]) == ["luod.3.u0.app", "luod.4.u0.cache"]
    assert_store_held_once(pid1)
    # The store's entries (sessions, two parkings' ends, the manifest, the
    # journal) and the three files.
    assert wait_fd_count(pid1, infra + 9 + 3) == infra + 9 + 3

    # A restart in the new boot: the adopted session is still incoming,
    # with the same deadline; the managed ones are carried.
    pid1.kill9()
    pid1.start()
    with pid1.client() as c:
        assert c.status()["reclaim"]["state"] == "restored"
        sessions = {s["name"]: s for s in c.list_sessions()}
        assert sessions["client-own"]["state"] == "incoming"
        assert sessions["client-own"]["claimDeadlineUSec"] == deadline
        problems = c.check()["problems"]
        assert [p["session"] for p in problems] == ["client-own"]
        assert "will be lost" in problems[0]["reason"]
        os.close(c.retrieve_session("client-own"))
    # The store's copy goes once the reply went out (luod then tells PID 1).
    wait_until(lambda: "session.client-own" not in pid1.names(), "the store lets go of it")

    pid1.kexec()
    pid1.start()
    with pid1.client() as c:
        assert c.status()["kexecCount"] == 2
        for key, want in facts.items():
            session, name = key.split("/")
            fd = c.retrieve_fd(session, name, take=True)
            assert memfd_facts(fd) == want
            os.close(fd)
        assert c.list_sessions() == []
    # Every file reference went with its file.
    assert pid1.names() == ["luod-journal", "luod-manifest-a"]


def test_unclaimed_incoming_session_is_lost_at_the_next_kexec(pid1: FakePid1) -> None:
    pid1.start()
    with pid1.client() as c:
        _adopt_client_session(pid1, c, b"never claimed")
        c.preserve_fd("app", "f", make_memfd(b"f"), create_session=True)
    pid1.kexec()
    pid1.start()
    with pid1.client() as c:
        assert c.check()["problems"][0]["session"] == "client-own"
        os.close(c.retrieve_fd("app", "f"))
    pid1.kexec()  # the kernel drops unfinished incoming sessions; PID 1 skips it
    pid1.start()
    with pid1.client() as c:
        st = c.status()
        assert st["reclaim"]["lost"] == ["client-own"]
        assert [s["name"] for s in c.list_sessions()] == ["app"]
    assert "event=session-lost session=client-own" in pid1.log()
    assert pid1.names() == [
        "luod-journal",
        "luod-manifest-a",
        "refs.luod.3.u0.app",
        "refs.luod.3.u0.app",
        "session.luod.3.u0.app",
    ]


def test_dropped_sessions_leave_the_store(pid1: FakePid1) -> None:
    pid1.start()
    # The manifest, and one session with one file (and its parking's two
    # ends), and the journal.
    baseline_fds = settled_fd_count(pid1) + 5
    with pid1.client() as c:
        c.preserve_fd("keep", "k", make_memfd(b"k"), create_session=True)
        baseline_store = pid1.names()
        for i in range(20):
            c.preserve_fds(
                f"tmp{i}", [("a", make_memfd(b"a")), ("b", make_memfd(b"b"))], create_session=True
            )
            if i % 2:
                c.discard_session(f"tmp{i}")
            else:
                # Taking one file rebuilds the session under a new name;
                # taking the last one drops it.
                os.close(c.retrieve_fd(f"tmp{i}", "a", take=True))
                os.close(c.retrieve_fd(f"tmp{i}", "b", take=True))
        sfd = pid1.kernel.create_session("mine")
        c.adopt_session(sfd)
        os.close(sfd)
        assert "session.mine" in pid1.names()
        # Before the kexec a copy: custody goes on until it is discarded.
        os.close(c.retrieve_session("mine"))
        assert "session.mine" in pid1.names()
        c.discard_session("mine")
    assert pid1.names() == baseline_store
    assert wait_fd_count(pid1, baseline_fds) == baseline_fds
    assert sorted(pid1.kernel.snapshot()["outgoing"]) == ["luod.1.u0.keep"]
    assert pid1.refused == []
    assert pid1.log().count("event=session-released") == 21


def test_manifest_outgrows_its_memfd(pid1: FakePid1) -> None:
    pid1.start()
    long = "s" * 40
    with pid1.client() as c:
        for i in range(200):
            c.preserve_fd(f"{long}{i}", "f", make_memfd(b"x"), create_session=True)
        carrier = c.status()["carrier"]
    # It grew (to 256 KiB: twice, since the base leaves its log room too),
    # each time into a new memfd under the other name.
    assert "(262144 bytes)" in carrier, carrier
    names = pid1.names()
    # The new one went in before the old one went out: never none, never two.
    assert [n for n in names if n.startswith("luod-manifest")] == ["luod-manifest-a"]
    # 200 sessions, the two ends of each one's parking, the journal.
    assert len(names) == 602
    log = pid1.log()
    assert "event=fdstore-manifest-created name=luod-manifest-b" in log
    assert "event=fdstore-manifest-created name=luod-manifest-a" in log
    pid1.kill9()
    pid1.start()
    with pid1.client() as c:
        assert len(c.list_sessions()) == 200
        assert c.check()["ready"] is True
    assert_store_held_once(pid1)


def test_crash_between_two_manifests_takes_the_newer(pid1: FakePid1) -> None:
    pid1.start()
    with pid1.client() as c:
        c.preserve_fd("s", "f", make_memfd(b"f"), create_session=True)
    pid1.kill9()
    # As if luod died after pushing a new manifest but before removing the
    # old: a copy of the old one stays (stale: it names no session).
    stale = os.memfd_create("stale", os.MFD_CLOEXEC)
    os.ftruncate(stale, capacity_for(10))
    write_slot(stale, capacity_for(10), 0, 1, b'{"stale": 1}')
    pid1.add("luod-manifest-b", stale)
    pid1.start()
    with pid1.client() as c:
        assert [s["name"] for s in c.list_sessions()] == ["s"]
    assert pid1.names() == [
        "luod-journal",
        "luod-manifest-a",
        "refs.luod.1.u0.s",
        "refs.luod.1.u0.s",
        "session.luod.1.u0.s",
    ]
    assert "event=fdstore-manifest-dropped name=luod-manifest-b" in pid1.log()


def test_unknown_store_entries_are_closed_and_removed(pid1: FakePid1) -> None:
    pid1.start()
    with pid1.client() as c:
        c.preserve_fd("s", "f", make_memfd(b"f"), create_session=True)
    pid1.kill9()
    r, w = os.pipe()
    os.close(w)
    pid1.add("junk", r)
    pid1.add("stray", make_memfd(b"stray"))
    orphan = pid1.kernel.create_session("orphan")
    pid1.add(fdname_for("orphan"), orphan)
    pid1.start()
    log = pid1.log()
    assert "event=fdstore-fd-closed name=junk" in log
    assert "event=fdstore-fd-closed name=stray" in log
    assert "event=fdstore-session-released kernel_name=orphan" in log
    assert pid1.names() == [
        "luod-journal",
        "luod-manifest-a",
        "refs.luod.1.u0.s",
        "refs.luod.1.u0.s",
        "session.luod.1.u0.s",
    ]
    # Nothing holds the orphan any more, so the kernel let it go.
    assert sorted(pid1.kernel.snapshot()["outgoing"]) == ["luod.1.u0.s"]
    assert_store_held_once(pid1)


def test_sessions_without_manifest_release_nothing(pid1: FakePid1) -> None:
    sfd = pid1.kernel.create_session("lonely")
    pid1.add(fdname_for("lonely"), sfd)
    pid1.start()
    with pid1.client() as c:
        st = c.status()
        assert st["reclaim"]["state"] == "failed"
        assert "no manifest" in st["reclaim"]["error"]
        assert c.check()["ready"] is False
    assert pid1.names() == ["session.lonely"]
    assert "lonely" in pid1.kernel.snapshot()["outgoing"]


# --- socket activation ------------------------------------------------------------


def test_uses_the_activated_socket(pid1: FakePid1) -> None:
    pid1.start()
    with pid1.client() as c:
        assert c.list_sessions() == []
    assert not (pid1.workdir / "unused.sock").exists()


def test_connected_socket_is_refused(pid1: FakePid1) -> None:
    pid1.start()
    with pid1.client() as c:
        c.preserve_fd("s", "f", make_memfd(b"f"), create_session=True)
    pid1.kill9()
    store = pid1.names()
    a, b = socket.socketpair()
    proc = pid1.spawn(a.fileno())
    assert proc.wait(20) == 1
    assert "not a listening socket" in pid1.log()
    assert "Accept=no" in pid1.log()
    a.close()
    b.close()
    # Refused before anything was taken over: the store is as it was.
    assert pid1.names() == store
    assert "luod.1.u0.s" in pid1.kernel.snapshot()["outgoing"]


def test_without_fd_store_falls_back_and_closes_listen_fds(workdir: Path, fake_kernel: str) -> None:
    manager = FakePid1(workdir, fake_kernel, store_max=None)
    try:
        manager.add("session.x", make_memfd(b"left over"))
        manager.start()
        log = manager.log()
        assert "event=carrier-chosen carrier=state-session" in log
        assert "event=listen-fd-closed name=session.x" in log
        with manager.client() as c:
            assert c.status()["carrier"].startswith("manifest in LUO session")
        # luod closed its copy only: the store still has it.
        assert manager.names() == ["session.x"]
    finally:
        manager.close()


@pytest.mark.parametrize(
    ("version", "said"),
    [
        (
            "258.3-1",
            "the service manager is systemd 258.3-1, which closes luod's fd store before a kexec",
        ),
        (None, "cannot tell whether the service manager carries luod's fd store over a kexec"),
    ],
)
def test_service_manager_that_drops_the_store_fails_preflight(
    workdir: Path, fake_kernel: str, version: str | None, said: str
) -> None:
    """$FDSTORE alone does not say the store survives a kexec: under systemd
    254..260 (or one that cannot be asked) luod still uses the store within
    the boot, but its preflight check names what a kexec would do."""
    manager = FakePid1(workdir, fake_kernel, version=version)
    try:
        manager.start()
        log = manager.log()
        assert "event=carrier-chosen carrier=fdstore" in log
        assert "event=service-manager-drops-fdstore" in log
        with manager.client() as c:
            c.preserve_fd("s", "f", make_memfd(b"f"), create_session=True)
            check = c.check()
            assert check["ready"] is False
            assert [p["session"] for p in check["problems"]] == [""]
            assert said in check["problems"][0]["reason"]
            assert "NOT carried over a kexec" in c.status()["carrier"]
            c.load_kernel(
                str(fake_bzimage(workdir / "bzImage")), cmdline="console=ttyS0 kho=on liveupdate=on"
            )
            with pytest.raises(VarlinkError) as e:
                c.update()
            assert e.value.short == "PreflightFailed", e.value
            assert said in e.value.parameters["reason"]
        # Within the boot the store works as ever.
        assert "session.luod.1.u0.s" in manager.names()
    finally:
        manager.close()


@pytest.mark.parametrize(
    ("version", "problem"),
    [
        ("262.1-1", False),
        ("261", False),
        ("300~rc1", False),
        ("260.5-2", True),
        ("254", True),
        ("v262", True),  # not systemd's form: not trusted
    ],
)
def test_fdstore_kexec_problem_by_version(
    workdir: Path, fake_kernel: str, version: str, problem: bool
) -> None:
    manager = FakePid1(workdir, fake_kernel, version=version)
    try:
        found, reported = servicemanager.fdstore_kexec_problem(manager.manager_path)
        assert reported == version
        assert (found is not None) is problem, found
    finally:
        manager.close()


def test_fdstore_kexec_problem_without_socket(workdir: Path) -> None:
    found, reported = servicemanager.fdstore_kexec_problem(str(workdir / "none"))
    assert reported == "unknown"
    assert found is not None and f"{workdir / 'none'}: No such file or directory" in found


# --- a file busy elsewhere ----------------------------------------------------------

NOBODY = 65534


def _take_with_the_file_stolen(socket_path: str, fake_kernel: str) -> dict[str, Any]:
    """As nobody: a session of two files, a delegated session of its own,
    and a thread putting one of the files into the delegated one the moment
    the kernel lets it go, while nobody takes the other file (the session is
    rebuilt without it: the old one goes first, then the file is preserved
    again). What nobody was told."""
    out: dict[str, Any] = {}
    kernel = FakeBackend(fake_kernel)
    with Client(socket_path) as c:
        a = make_memfd(b"a")
        c.preserve_fds("s", [("a", os.dup(a)), ("b", make_memfd(b"b"))], create_session=True)
        delegated = c.create_delegated_session("mine")
        taken = threading.Event()

        def steal() -> None:
            while not taken.is_set():
                try:
                    kernel.preserve_fd(delegated, a, 1)
                    out["stolen"] = True
                    return
                except LuoError as e:
                    assert e.errno == errno.EBUSY, e

        thief = threading.Thread(target=steal)
        thief.start()
        try:
            os.close(c.retrieve_fd("s", "b", take=True))
            out["take"] = "taken"
        except VarlinkError as e:
            out["take"] = e.short
        taken.set()
        thief.join()
    return out


def test_a_file_busy_in_another_session_does_not_hold_luod_up(pid1: FakePid1) -> None:
    """Rebuilding a session, luod waited (in its one thread) up to 3 s for
    a file to be let go of by the session PID 1 still held a copy of. A
    file nobody had put into a session of its own meanwhile never was: so
    nobody's take held luod, root's calls with it, for 3 s, as often as
    nobody liked. luod now waits for PID 1 to have let go of the old
    session (one barrier, answered when PID 1 has read what came before)
    and tries once more: a file still busy is somebody else's, and the
    take is refused at once. Asserted by what luod asked of PID 1, not by
    a clock: before, it asked nothing and slept."""
    pid1.start()
    os.chmod(pid1.luod.socket, 0o666)  # as luod.socket makes it
    before = pid1.barriers
    seen = run_as(NOBODY, lambda: _take_with_the_file_stolen(pid1.luod.socket, pid1.fake_kernel))
    asked = pid1.barriers - before
    # nobody's own session pays: taken, or (its file stolen) not carried.
    assert seen["take"] == ("KernelRefused" if seen.get("stolen") else "taken"), seen
    if seen.get("stolen"):
        assert asked == 1, (asked, seen)
    else:
        assert asked <= 1, (asked, seen)
    with pid1.client() as c:
        assert c.status()["files"] >= 0  # luod serves on


def _carrier_as_nobody(socket_path: str) -> str:
    with Client(socket_path) as c:
        return str(c.status()["carrier"])


def test_what_the_carrier_holds_in_all_is_roots_to_know(pid1: FakePid1) -> None:
    """GetStatus's carrier said to anyone how many sessions luod holds in
    PID 1's fd store, and the manifest's size (which grows with what all
    uids hold); the rest of GetStatus tells a non-root caller only of its
    own. Now it says to such a caller how luod's state is carried, and
    whether it is over a kexec; root is told the counts as before."""
    pid1.start()
    os.chmod(pid1.luod.socket, 0o666)  # as luod.socket makes it
    with pid1.client() as c:
        c.preserve_fd("s", "f", make_memfd(b"x"), create_session=True)
        assert "1 session fds" in c.status()["carrier"], c.status()["carrier"]
    assert run_as(NOBODY, lambda: _carrier_as_nobody(pid1.luod.socket)) == "fd store"
