"""What GetStatus, Check and luoctl say a crash of luod would cost, and
that a crash then costs exactly that: under the state-session carrier
(plain luod on the fake kernel) everything luod holds, under the fd-store
carrier (testsupport.fakepid1) nothing but the sessions whose fds are not
in the store. Root is told about everyone, uid 65534 about its own."""

from __future__ import annotations

import contextlib
import io
import os
import signal
from pathlib import Path
from typing import Any

from luod.carriers.fdstore import fdname_for
from luod.cli.main import main as luoctl
from luod.client import Client, VarlinkError
from testsupport.fakekernel import FakeBackend
from testsupport.fakepid1 import FakePid1
from testsupport.luodproc import LuodProcess
from testsupport.util import make_memfd, run_as

NOBODY = 65534
STATE_SESSION_WHY = (
    "luod holds every session fd itself (state-session carrier) and nothing outside luod "
    "holds a copy; its exit closes them, and the kernel unpreserves a session whose last fd "
    "is closed"
)
FDSTORE_WHY = (
    "the service manager's fd store (fdstore carrier) keeps luod's session fds, its manifest "
    "and its references to every file; a restarted luod takes them back"
)


def _hand_off(c: Client, session: str, files: dict[str, int]) -> None:
    for name, size in files.items():
        fd = make_memfd(os.urandom(size))
        try:
            c.preserve_fd(session, name, fd, create_session=True)
        finally:
            os.close(fd)


def _hand_off_as_nobody(socket: str, session: str, files: dict[str, int]) -> None:
    def work() -> None:
        with Client(socket) as c:
            _hand_off(c, session, files)

    run_as(NOBODY, work)


def _seen_by(socket: str, uid: int) -> dict[str, Any]:
    """GetStatus's and Check's crashCost, and what luoctl status and check
    print, as `uid` sees them."""

    def work() -> dict[str, Any]:
        with Client(socket) as c:
            status, check = c.status()["crashCost"], c.check()["crashCost"]
        printed = {}
        for command in ("status", "check"):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                luoctl([f"--socket={socket}", command])
            printed[command] = out.getvalue()
        return {"status": status, "check": check, "printed": printed}

    return run_as(uid, work)


def _cost(seen: dict[str, Any]) -> tuple[int, int, int, bool]:
    assert seen["status"] == seen["check"]
    cost = seen["status"]
    return (cost["sessions"], cost["files"], cost["bytesPinned"], cost["everything"])


def _kill9(luod: LuodProcess) -> None:
    assert luod.proc is not None
    luod.proc.send_signal(signal.SIGKILL)
    luod.proc.wait(10)


# --- the state-session carrier: a crash releases everything ---------------------


def test_state_session_a_crash_costs_everything(luod: LuodProcess, fake_kernel: str) -> None:
    with luod.client() as c:
        _hand_off(c, "app", {"a": 1000, "b": 3000})
    _hand_off_as_nobody(luod.socket, "mine", {"x": 500})

    root = _seen_by(luod.socket, 0)
    assert _cost(root) == (2, 3, 4500, True)
    assert root["status"]["reason"] == STATE_SESSION_WHY
    assert root["status"]["problems"] == []
    line = (
        "a luod crash now would release 2 sessions, 3 files, 4.4 KiB (everything luod holds): "
        + STATE_SESSION_WHY
    )
    assert line in root["printed"]["status"].splitlines()
    assert root["printed"]["check"].splitlines() == [
        "ready: nothing would be lost by a kexec now",
        line,
    ]
    nobody = _seen_by(luod.socket, NOBODY)
    assert _cost(nobody) == (1, 1, 500, True)
    assert nobody["status"]["reason"] == STATE_SESSION_WHY
    assert (
        "a luod crash now would release 1 session, 1 file, 500 B (everything luod holds for "
        "you): " + STATE_SESSION_WHY
    ) in nobody["printed"]["check"].splitlines()

    # What it said: the kernel drops every session luod held, and a
    # restarted luod holds nothing.
    outgoing = FakeBackend(fake_kernel).snapshot()["outgoing"]
    assert sorted(outgoing) == ["luod", "luod.1.u0.app", "luod.2.u65534.mine"]
    _kill9(luod)
    assert FakeBackend(fake_kernel).snapshot()["outgoing"] == {}
    luod.start()
    with luod.client() as c:
        assert c.list_sessions() == []
        assert _cost({"status": c.status()["crashCost"], "check": c.check()["crashCost"]}) == (
            0,
            0,
            0,
            True,
        )


# --- the fd-store carrier: a crash releases nothing but what is not in the store --


def _open_to_all(pid1: FakePid1) -> None:
    """luod.socket's SocketMode=0666 on the manager's socket."""
    os.chmod(pid1.luod.socket, 0o666)


def _listing(c: Client) -> list[tuple[int, str, list[tuple[str, int, int]]]]:
    return sorted(
        (s["owner"]["uid"], s["name"], [(f["name"], f["token"], f["size"]) for f in s["files"]])
        for s in c.list_sessions()
    )


def test_fdstore_a_crash_costs_nothing(pid1: FakePid1) -> None:
    pid1.start()
    _open_to_all(pid1)
    with pid1.client() as c:
        _hand_off(c, "app", {"a": 1000, "b": 3000})
    _hand_off_as_nobody(pid1.luod.socket, "mine", {"x": 500})

    for uid in (0, NOBODY):
        seen = _seen_by(pid1.luod.socket, uid)
        assert _cost(seen) == (0, 0, 0, False)
        assert seen["status"]["reason"] == FDSTORE_WHY
        assert seen["status"]["problems"] == []
        line = "a luod crash now would release nothing: " + FDSTORE_WHY
        assert line in seen["printed"]["status"].splitlines()
        assert line in seen["printed"]["check"].splitlines()

    # What it said: everything is there after a kill -9 and a restart.
    with pid1.client() as c:
        before = _listing(c)
    pid1.kill9()
    pid1.start()
    with pid1.client() as c:
        assert _listing(c) == before
        assert c.status()["reclaim"]["lost"] == []


def test_fdstore_names_the_sessions_not_in_the_store(workdir: Path, fake_kernel: str) -> None:
    """A store too small for all: what did not fit is what a crash would
    cost, each session named, to its owner only."""
    manager = FakePid1(workdir, fake_kernel, store_max=6)
    try:
        manager.start()
        _open_to_all(manager)
        with manager.client() as c:
            _hand_off(c, "root-app", {"a": 1000})
        run_as(NOBODY, lambda: _try_hand_offs(manager.luod.socket))
        with manager.client() as c:
            sessions = {
                (s["owner"]["uid"], s["name"]): s
                for s in c.list_sessions()
                if s["files"]  # a refused hand-off may leave its new session empty
            }
        stored = set(manager.names())
        missing = {
            key: s for key, s in sessions.items() if fdname_for(s["kernelName"]) not in stored
        }
        # The store took some, not all; root's came first and fit.
        assert missing and (0, "root-app") not in missing
        assert all(uid == NOBODY for uid, _ in missing)

        root = _seen_by(manager.luod.socket, 0)
        nobody = _seen_by(manager.luod.socket, NOBODY)
        size = sum(f["size"] for s in missing.values() for f in s["files"])
        files = sum(len(s["files"]) for s in missing.values())
        assert _cost(nobody)[:3] == (len(missing), files, size)
        assert sorted(p["session"] for p in nobody["status"]["problems"]) == sorted(
            name for _, name in missing
        )
        for p in nobody["status"]["problems"]:
            assert "not in luod's fd store" in p["reason"]
        assert "keeps all but the sessions listed" in nobody["status"]["reason"]
        printed = nobody["printed"]["status"].splitlines()
        first = next(i for i, line in enumerate(printed) if line.startswith("a luod crash now"))
        assert printed[first].startswith(f"a luod crash now would release {len(missing)} session")
        assert sorted(printed[first + 1 :]) == sorted(
            f"  {p['session']}: {p['reason']}" for p in nobody["status"]["problems"]
        )
        # Root is told the same of uid 65534's; nothing of its own is concerned.
        assert _cost(root) == _cost(nobody)
        assert root["status"]["problems"] == nobody["status"]["problems"]

        # What it said: after kill -9 and a restart exactly those are gone.
        manager.kill9()
        manager.start()
        with manager.client() as c:
            after = {(s["owner"]["uid"], s["name"]) for s in c.list_sessions() if s["files"]}
            lost = c.status()["reclaim"]["lost"]
        assert after == set(sessions) - set(missing)
        assert sorted(lost) == sorted(
            f"{name}/{f['name']}" for (_, name), s in missing.items() for f in s["files"]
        )
    finally:
        manager.close()
        print(f"--- luod logs ({workdir}) ---\n{manager.all_logs()}")


def _try_hand_offs(socket: str) -> None:
    """Hand-offs into new sessions past what the store takes; luod may
    refuse some."""
    with Client(socket) as c:
        for i in range(6):
            with contextlib.suppress(VarlinkError):
                _hand_off(c, f"s{i}", {"f": 100 * (i + 1)})
