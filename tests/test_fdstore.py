"""The fd store carrier: luod under a fake service manager.

`FakePid1` plays systemd >= 261 for one service: a datagram notify socket
with FDSTORE=1 / FDSTOREREMOVE=1 / FDNAME= / READY=1 semantics (it keeps
every fd it is sent and deduplicates nothing), socket activation of the
varlink socket, and restarts that pass the store back in LISTEN_FDS /
LISTEN_FDNAMES / LISTEN_PID. Its `kexec()` does what PID 1 does over a live
update (src/core/luo.c, src/shared/luo-util.c): memfds of the store go into
a LUO session 'systemd' of its own, session fds are recorded by session
name; after the (fake) kexec both are retrieved and put back into the store
under the same FDNAMEs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from luod import fdstore, servicemanager
from luod.carrier import IncomingState
from luod.client import Client, VarlinkError
from luod.daemon import choose_carrier
from luod.fdstore import FdStoreCarrier, fdname_for
from luod.kernel import fake, fdinfo
from luod.kernel.backend import LuoError
from luod.kernel.fake import FakeBackend
from luod.manifest import ManifestError, capacity_for, write_slot
from luod.notify import ListenFd
from tests.util import fake_bzimage, make_memfd, memfd_facts

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 20.0
SYSTEMD_SESSION = "systemd"  # PID 1's own LUO session (LUO_SESSION_NAME)
MAPPING_TOKEN = 0  # where PID 1 keeps its mapping memfd (LUO_MAPPING_INDEX)

# Runs in the child: moves the fds named in $FAKE_PID1_FDS to 3, 4, ... and
# sets LISTEN_PID to its own pid, which exec keeps for luod.
_EXEC_WITH_LISTEN_FDS = """
import fcntl, os, sys
src = [int(x) for x in os.environ.pop("FAKE_PID1_FDS").split(",") if x]
# Out of the way first: a source may sit where another one must land.
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(src)) for fd in src]
for fd in src:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
if src:
    os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def fdname_is_valid(name: str) -> bool:
    """systemd's fdname_is_valid(): printable ASCII but ':', 1..255 chars."""
    return 0 < len(name) <= 255 and all(" " <= c <= "~" and c != ":" for c in name)


@dataclasses.dataclass
class StoreEntry:
    name: str
    fd: int


class FakePid1:
    """One service's manager: notify socket, fd store, socket activation."""

    def __init__(
        self,
        workdir: Path,
        fake_kernel: str,
        store_max: int | None = 4096,
        version: str | None = "262.1-1",
    ) -> None:
        """`version`: what the manager's varlink socket answers to GetInfo
        (None: there is no such socket, as before systemd 257)."""
        self.workdir = workdir
        self.version = version
        self.fake_kernel = fake_kernel
        self.kernel = FakeBackend(fake_kernel)
        self.store_max = store_max
        self.store: list[StoreEntry] = []
        self.refused: list[str] = []  # messages the manager refused, and why
        self.proc: subprocess.Popen[bytes] | None = None
        self.generation = 0
        self.notify_path = str(workdir / "notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.notify.bind(self.notify_path)
        self.notify.settimeout(0.1)
        # The varlink socket, as luod.socket makes it: the manager's, kept
        # across luod's restarts.
        self.socket_path = str(workdir / "io.luod")
        self.varlink = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.varlink.bind(self.socket_path)
        self.varlink.listen(16)
        self._cond = threading.Condition()
        self._ready = 0  # READY=1 messages seen
        self._barriers = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        # The manager's own varlink socket (io.systemd.Manager).
        self.manager_path = str(workdir / "io.systemd.Manager")
        if version is not None:
            self.manager = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self.manager.bind(self.manager_path)
            self.manager.listen(16)
            threading.Thread(target=self._serve_manager, daemon=True).start()

    # --- io.systemd.Manager: GetInfo only -------------------------------------

    def _serve_manager(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.manager.accept()
            except OSError:
                return
            with conn:
                request = b""
                while not request.endswith(b"\0"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    request += chunk
                if json.loads(request[:-1]).get("method") == "org.varlink.service.GetInfo":
                    info = {"vendor": "systemd", "product": "systemd", "version": self.version}
                    conn.sendall(json.dumps({"parameters": info}).encode() + b"\0")

    # --- the notify socket --------------------------------------------------

    def _serve(self) -> None:
        while not self._stop:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(
                    self.notify, 65536, 253, socket.MSG_CMSG_CLOEXEC
                )
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self._handle(msg.decode(), fds)
                self._cond.notify_all()

    def _handle(self, text: str, fds: list[int]) -> None:
        fields = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
        if fields.get("FDSTORE") == "1":
            name = fields.get("FDNAME", "stored")
            if not fdname_is_valid(name):
                self._refuse(f"invalid FDNAME {name!r}", fds)
            elif self.store_max is not None and len(self.store) + len(fds) > self.store_max:
                self._refuse(f"store full for {name!r}", fds)
            else:
                self.store.extend(StoreEntry(name, fd) for fd in fds)
        else:
            for fd in fds:
                os.close(fd)  # systemd closes fds sent without FDSTORE=1
        if fields.get("FDSTOREREMOVE") == "1":
            name = fields.get("FDNAME", "")
            for e in [e for e in self.store if e.name == name]:
                os.close(e.fd)
                self.store.remove(e)
        if fields.get("READY") == "1":
            self._ready += 1
        if "BARRIER" in fields:
            self._barriers += 1

    def _refuse(self, why: str, fds: list[int]) -> None:
        self.refused.append(why)
        for fd in fds:
            os.close(fd)

    def settle(self) -> None:
        """Wait until every message sent so far was handled: datagrams are
        handled in order, so a barrier sent now comes after them."""
        with self._cond:
            want = self._barriers + 1
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"BARRIER=1", self.notify_path)
        with self._cond:
            assert self._cond.wait_for(lambda: self._barriers >= want, 10)

    def names(self) -> list[str]:
        self.settle()
        with self._cond:
            return sorted(e.name for e in self.store)

    def entries(self) -> list[StoreEntry]:
        self.settle()
        with self._cond:
            return list(self.store)

    def add(self, name: str, fd: int) -> None:
        """Put `fd` (taken over) into the store, as if the service had."""
        with self._cond:
            self.store.append(StoreEntry(name, fd))

    # --- running luod ---------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.workdir / f"luod-{self.generation}.log"

    def log(self) -> str:
        return self.log_path.read_text()

    def all_logs(self) -> str:
        return "".join(
            (self.workdir / f"luod-{g}.log").read_text()
            for g in range(1, self.generation + 1)
            if (self.workdir / f"luod-{g}.log").exists()
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def spawn(self, varlink_fd: int | None = None, *args: str) -> subprocess.Popen[bytes]:
        """Start luod with the store (and the varlink socket) in LISTEN_FDS."""
        self.settle()
        self.generation += 1
        varlink = self.varlink.fileno() if varlink_fd is None else varlink_fd
        with self._cond:
            passed = [("varlink", varlink)] + [(e.name, e.fd) for e in self.store]
        env = dict(
            os.environ,
            NOTIFY_SOCKET=self.notify_path,
            PYTHONUNBUFFERED="1",
            LISTEN_FDS=str(len(passed)),
            LISTEN_FDNAMES=":".join(name for name, _ in passed),
            FAKE_PID1_FDS=",".join(str(fd) for _, fd in passed),
        )
        env.pop("FDSTORE", None)
        if self.store_max is not None:
            env["FDSTORE"] = str(self.store_max)
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _EXEC_WITH_LISTEN_FDS,
                    "-m",
                    "luod.daemon",
                    "--backend=fake",
                    f"--fake-kernel={self.fake_kernel}",
                    # Not used when activated: tests check it never appears.
                    f"--socket={self.workdir / 'unused.sock'}",
                    f"--service-manager={self.manager_path}",
                    *args,
                ],
                pass_fds=[fd for _, fd in passed],
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        return self.proc

    def start(self, *args: str) -> None:
        with self._cond:
            seen = self._ready
        proc = self.spawn(None, *args)
        deadline = time.monotonic() + READY_TIMEOUT
        with self._cond:
            while self._ready == seen:
                if proc.poll() is not None:
                    raise RuntimeError(f"luod exited with {proc.returncode}:\n{self.log()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"luod did not get ready:\n{self.log()}")
                self._cond.wait(0.1)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self) -> Client:
        return Client(self.socket_path)

    # --- kexec, as PID 1 does it ------------------------------------------------

    def kexec(self) -> None:
        """Stop luod (Conflicts=shutdown.target), carry the store over a fake
        kexec as systemd >= 261 does, and put it back into the store."""
        self.stop()
        self.settle()
        with self._cond:
            mapping, holders = self._preserve_store()
            fake.kexec(self.fake_kernel)
            # The old userspace is gone with everything it held.
            for fd in [e.fd for e in self.store] + holders:
                os.close(fd)
            self.store = self._restore_store(mapping)

    def _preserve_store(self) -> tuple[list[dict[str, Any]], list[int]]:
        session = self.kernel.create_session(SYSTEMD_SESSION)
        entries: list[dict[str, Any]] = []
        token = MAPPING_TOKEN + 1
        for e in self.store:
            name = self.kernel.identify_session(e.fd)
            if name == SYSTEMD_SESSION:
                continue  # infringes PID 1's namespace
            if name is not None:
                # Sessions cannot be nested: the store's copy keeps it open
                # until the reboot syscall; only its name is recorded.
                entries.append({"type": "luo_session", "name": e.name, "sessionName": name})
                continue
            try:
                self.kernel.preserve_fd(session, e.fd, token)
            except LuoError:
                continue  # PID 1 logs it: "will be lost across kexec"
            entries.append({"type": "fd", "name": e.name, "token": token})
            token += 1
        mapping = make_memfd(
            json.dumps({"version": 1, "units": {"luod.service": entries}}).encode()
        )
        self.kernel.preserve_fd(session, mapping, MAPPING_TOKEN)
        return entries, [session, mapping]

    def _restore_store(self, recorded: list[dict[str, Any]]) -> list[StoreEntry]:
        session = self.kernel.retrieve_session(SYSTEMD_SESSION)
        mapping_fd = self.kernel.retrieve_fd(session, MAPPING_TOKEN)
        mapping = json.loads(os.pread(mapping_fd, 1 << 20, 0))
        assert mapping["units"]["luod.service"] == recorded
        store = []
        for entry in mapping["units"]["luod.service"]:
            try:
                if entry["type"] == "fd":
                    fd = self.kernel.retrieve_fd(session, entry["token"])
                else:
                    fd = self.kernel.retrieve_session(entry["sessionName"])
            except LuoError:
                continue  # PID 1 logs it and goes on (an unclaimed incoming session)
            store.append(StoreEntry(entry["name"], fd))
        self.kernel.finish_session(session)
        os.close(session)
        os.close(mapping_fd)
        return store

    def close(self) -> None:
        self.stop()
        self._stop = True
        self._thread.join()
        self.notify.close()
        self.varlink.close()
        if self.version is not None:
            self.manager.shutdown(socket.SHUT_RDWR)  # wakes accept()
            self.manager.close()
        for e in self.store:
            os.close(e.fd)
        self.store = []


@pytest.fixture
def pid1(workdir: Path, fake_kernel: str) -> Iterator[FakePid1]:
    manager = FakePid1(workdir, fake_kernel)
    try:
        yield manager
    finally:
        manager.close()
        print(f"--- luod logs ({workdir}) ---\n{manager.all_logs()}")


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
    assert store == [
        "luod-manifest-a",
        "session.client-own",
        "session.luod.1.app",
        "session.luod.2.db",
    ]
    pid1.kill9()
    # The store kept every session open: the kernel still has them.
    outgoing = pid1.kernel.snapshot()["outgoing"]
    assert outgoing["luod.1.app"]["tokens"] == [1, 2]
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
        assert c.check() == {"ready": True, "problems": []}
        # No reference to the files until the next kexec, and luod says so.
        for take in (False, True):
            with pytest.raises(VarlinkError) as e:
                c.retrieve_fd("app", "a", take=take)
            assert e.value.short == "NotReady"
            assert "restarted" in e.value.parameters["reason"]
    assert pid1.names() == store
    assert "event=session-restored session=app kind=managed state=outgoing" in pid1.log()
    assert_store_held_once(pid1)
    # The store's entries and luod's own fds, nothing else: no files yet.
    assert wait_fd_count(pid1, infra + len(store)) == infra + len(store)

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
        # One file at a time: a failed batch could not be undone.
        with pytest.raises(VarlinkError) as e:
            c.preserve_fds("s", [("n1", make_memfd(b"1")), ("n2", make_memfd(b"2"))])
        assert e.value.short == "NotReady"
        c.preserve_fd("s", "new", make_memfd(b"new"))
        copy = c.retrieve_fd("s", "new")
        assert os.pread(copy, 10, 0) == b"new"
        os.close(copy)
        # Taking it would rebuild the session from files luod has no reference to.
        with pytest.raises(VarlinkError) as e:
            c.retrieve_fd("s", "new", take=True)
        assert e.value.short == "NotReady"
        assert c.check()["ready"] is True
    pid1.kexec()
    pid1.start()
    with pid1.client() as c:
        for name, want in (("old", b"old"), ("new", b"new")):
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
    # PID 1 gave back what luod had stored, by the same names.
    assert pid1.names() == [
        "luod-manifest-a",
        "session.client-own",
        "session.luod.1.app",
        "session.luod.2.cache",
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
    # The incoming sessions were taken over into new ones; their entries went.
    assert pid1.names() == [
        "luod-manifest-a",
        "session.client-own",
        "session.luod.3.app",
        "session.luod.4.cache",
    ]
    snap = pid1.kernel.snapshot()
    assert sorted(snap["incoming"]) == ["client-own"]
    assert sorted(snap["outgoing"]) == ["luod.3.app", "luod.4.cache"]
    assert_store_held_once(pid1)
    # Sessions and the manifest (the store's entries) and the three files.
    assert wait_fd_count(pid1, infra + 4 + 3) == infra + 4 + 3

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
    assert "session.client-own" not in pid1.names()

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
    assert pid1.names() == ["luod-manifest-a"]


def test_dropped_sessions_leave_the_store(pid1: FakePid1) -> None:
    pid1.start()
    # The manifest, and one session with one file.
    baseline_fds = settled_fd_count(pid1) + 2
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
    assert sorted(pid1.kernel.snapshot()["outgoing"]) == ["luod.1.keep"]
    assert pid1.refused == []
    assert pid1.log().count("event=session-released") == 21


def test_manifest_outgrows_its_memfd(pid1: FakePid1) -> None:
    pid1.start()
    long = "s" * 40
    with pid1.client() as c:
        for i in range(200):
            c.preserve_fd(f"{long}{i}", "f", make_memfd(b"x"), create_session=True)
        assert "manifest 'luod-manifest-b'" in c.status()["carrier"]
    names = pid1.names()
    # The new one went in before the old one went out: never none.
    assert [n for n in names if n.startswith("luod-manifest")] == ["luod-manifest-b"]
    assert len(names) == 201
    assert "event=fdstore-manifest-created name=luod-manifest-b" in pid1.log()
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
    assert pid1.names() == ["luod-manifest-a", "session.luod.1.s"]
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
    assert pid1.names() == ["luod-manifest-a", "session.luod.1.s"]
    # Nothing holds the orphan any more, so the kernel let it go.
    assert sorted(pid1.kernel.snapshot()["outgoing"]) == ["luod.1.s"]
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
    assert "luod.1.s" in pid1.kernel.snapshot()["outgoing"]


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
            c.load_kernel(str(fake_bzimage(workdir / "bzImage")), cmdline="console=ttyS0")
            with pytest.raises(VarlinkError) as e:
                c.update()
            assert e.value.short == "PreflightFailed", e.value
            assert said in e.value.parameters["reason"]
        # Within the boot the store works as ever.
        assert "session.luod.1.s" in manager.names()
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


# --- pieces -------------------------------------------------------------------------


def test_choose_carrier() -> None:
    both = {"NOTIFY_SOCKET": "/run/systemd/notify", "FDSTORE": "65536"}
    assert choose_carrier("auto", both)[0] == "fdstore"
    assert choose_carrier("auto", {"NOTIFY_SOCKET": "/x"})[0] == "state-session"
    assert choose_carrier("auto", {"NOTIFY_SOCKET": "/x", "FDSTORE": "0"})[0] == "state-session"
    assert choose_carrier("auto", {"NOTIFY_SOCKET": "/x", "FDSTORE": "x"})[0] == "state-session"
    assert choose_carrier("auto", {"FDSTORE": "5"})[0] == "state-session"
    assert choose_carrier("state-session", both)[0] == "state-session"
    assert choose_carrier("fdstore", {})[0] == "fdstore"


@pytest.mark.parametrize(
    "kernel_name", ["luod.1.app", "a:b", "x" * 63, "odd%name", "sp ace", "ünï"]
)
def test_fdname_for_is_a_valid_unique_fd_name(kernel_name: str) -> None:
    name = fdname_for(kernel_name)
    assert fdname_is_valid(name)
    assert name.startswith(fdstore.SESSION_FDNAME_PREFIX)
    assert ":" not in name
    assert fdname_for("a:b") != fdname_for("a%3Ab")


class _Sink:
    def __init__(self) -> None:
        self.messages: list[tuple[str, int]] = []
        self.fds: list[int] = []

    def __call__(self, message: str, fds: Any) -> bool:
        self.messages.append((message, len(fds)))
        self.fds.extend(os.dup(fd) for fd in fds)
        return True

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def test_rebuild_pushes_the_new_manifest_before_removing_the_old(kernel: FakeBackend) -> None:
    sink = _Sink()
    carrier = FdStoreCarrier(kernel, [], store_max=10, send=sink)
    try:
        assert carrier.load() is None
        carrier.save(b"{}")
        carrier.save(b"x" * 40_000)  # more than a 64 KiB memfd's slot
        carrier.save(b"y" * 200_000)
        assert [m for m, _ in sink.messages] == [
            "FDSTORE=1\nFDNAME=luod-manifest-a\nFDPOLL=0",
            "FDSTORE=1\nFDNAME=luod-manifest-b\nFDPOLL=0",
            "FDSTOREREMOVE=1\nFDNAME=luod-manifest-a",
            "FDSTORE=1\nFDNAME=luod-manifest-a\nFDPOLL=0",
            "FDSTOREREMOVE=1\nFDNAME=luod-manifest-b",
        ]
        # The store's copy is the memfd luod writes to.
        carrier.save(b"z")
        newest = FdStoreCarrier(kernel, [ListenFd(os.dup(sink.fds[-1]), "luod-manifest-a")])
        state = newest.load()
        assert state == IncomingState(b"z", "fd store entry 'luod-manifest-a'")
        newest.close()
    finally:
        carrier.close()
        sink.close()


def test_full_store_is_a_problem(kernel: FakeBackend) -> None:
    sink = _Sink()
    carrier = FdStoreCarrier(kernel, [], store_max=2, send=sink)
    sessions = [kernel.create_session(f"s{i}") for i in range(2)]
    try:
        carrier.save(b"{}")
        carrier.session_held("s0", sessions[0])
        carrier.session_held("s1", sessions[1])  # the manifest and s0 fill it
        assert [
            (p.kernel_name, "lost when luod stops" in p.reason) for p in carrier.problems()
        ] == [("s1", True)]
        assert "1 not in the store" in carrier.describe()
        carrier.session_dropped("s1")
        assert carrier.problems() == []
    finally:
        carrier.close()
        sink.close()
        for fd in sessions:
            os.close(fd)


def test_unreadable_manifest_raises_and_keeps_everything(kernel: FakeBackend) -> None:
    sfd = kernel.create_session("kept")
    bad = make_memfd(b"\0" * 8192)
    carrier = FdStoreCarrier(
        kernel,
        [ListenFd(bad, "luod-manifest-a"), ListenFd(sfd, fdname_for("kept"))],
        send=_Sink(),
    )
    with pytest.raises(ManifestError):
        carrier.load()
    # Nothing was closed: the session is still there to be looked at.
    assert kernel.identify_session(sfd) == "kept"
    carrier.close()
    assert not fdinfo.is_valid_fd(sfd)  # close() closes luod's copies


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
    assert pid1.names() == ["luod-manifest-a", "session.luod.3.app"]
