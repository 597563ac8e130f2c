"""A file taken out of custody travels in a reply: if that reply is never
delivered (the client's connection closed first), luod holds the file
again instead of closing it with the reply. luod as its own process on the
fake kernel, real memfds over the real socket, simulated kexecs."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path
from typing import Any

from luod.carriers.fdstore import parking_fdname
from luod.client import Client
from luod.interfaces import CUSTODY
from testsupport.fakepid1 import FakePid1
from testsupport.guest import unread_reply
from testsupport.luodproc import LuodProcess, running_luod
from testsupport.util import MemfdFacts, make_memfd, memfd_facts, run_as, wait_until

NOBODY = 65534


def _hand_off(c: Client, session: str, names: list[str]) -> dict[str, MemfdFacts]:
    fds = [make_memfd(f"{session}/{name} ".encode() * 100, position=3) for name in names]
    try:
        c.preserve_fds(session, list(zip(names, fds, strict=True)), create_session=True)
        return {name: memfd_facts(fd) for name, fd in zip(names, fds, strict=True)}
    finally:
        for fd in fds:
            os.close(fd)


def _files(c: Client, session: str, owner: int | None = None) -> list[str]:
    return sorted(f["name"] for f in c.list_sessions(session, owner=owner)[0]["files"])


def _same(c: Client, session: str, facts: dict[str, MemfdFacts]) -> None:
    for name, fd in c.retrieve_fds(session, list(facts)):
        try:
            assert memfd_facts(fd) == facts[name], name
        finally:
            os.close(fd)


def test_a_take_whose_reply_is_not_delivered_is_held_again(luod: LuodProcess) -> None:
    with luod.client() as c:
        facts = _hand_off(c, "app", ["a", "b", "c", "d"])
    luod.kexec()  # taking out of a session that came over the kexec
    luod.call_unheard(
        f"{CUSTODY}.RetrieveFd",
        {"session": "app", "name": "a", "take": True},
        "fds-given-back",
    )
    with luod.client() as c:
        assert _files(c, "app") == ["a", "b", "c", "d"]
    luod.call_unheard(
        f"{CUSTODY}.RetrieveFds",
        {"session": "app", "names": ["b", "d"], "take": True},
        "fds-given-back",
    )
    # Every file of the session: luod let go of the session, and makes it
    # again.
    luod.call_unheard(f"{CUSTODY}.RetrieveFds", {"session": "app", "take": True}, "fds-given-back")
    log = luod.log()
    assert log.count("event=fds-given-back") == 3, log
    assert "fds-lost" not in log
    assert 'names=b,d owner="python (uid 0)"' in log
    with luod.client() as c:
        assert _files(c, "app") == ["a", "b", "c", "d"]
        _same(c, "app", facts)
    # Held, so carried.
    luod.kexec()
    with luod.client() as c:
        _same(c, "app", facts)
        # A reply read: taken, as always.
        os.close(c.retrieve_fd("app", "c", take=True))
        assert _files(c, "app") == ["a", "b", "d"]


def test_what_root_takes_for_another_uid_goes_back_to_that_uid(luod: LuodProcess) -> None:
    def hand_off() -> dict[str, Any]:
        with Client(luod.socket) as c:
            return {k: dataclasses.asdict(v) for k, v in _hand_off(c, "theirs", ["x"]).items()}

    facts = {k: MemfdFacts(**v) for k, v in run_as(NOBODY, hand_off).items()}
    luod.call_unheard(
        f"{CUSTODY}.RetrieveFd",
        {"session": "theirs", "name": "x", "take": True, "owner": NOBODY},
        "fds-given-back",
    )
    with luod.client() as c:
        [session] = c.list_sessions("theirs", owner=NOBODY)
        assert session["owner"]["uid"] == NOBODY
        assert [f["name"] for f in session["files"]] == ["x"]
        assert c.list_sessions("theirs")[0]["owner"]["uid"] == NOBODY  # none of root's
        for name, fd in c.retrieve_fds("theirs", ["x"], owner=NOBODY):
            assert memfd_facts(fd) == facts[name]
            os.close(fd)
    assert 'event=fds-given-back session=theirs names=x owner="python (uid 65534)"' in luod.log()


def test_a_session_handed_back_whose_reply_is_not_delivered_is_held_again(
    luod: LuodProcess,
) -> None:
    with luod.client() as c:
        os.close(c.create_delegated_session("own"))
        kernel_name = c.list_sessions("own")[0]["kernelName"]
    luod.kexec()
    # After the kexec the session itself goes out, not a copy.
    luod.call_unheard(f"{CUSTODY}.RetrieveSession", {"session": "own"}, "session-given-back")
    with luod.client() as c:
        [session] = c.list_sessions("own")
        assert (session["kernelName"], session["state"]) == (kernel_name, "incoming")
        os.close(c.retrieve_session("own"))
        assert c.list_sessions() == []


def test_a_oneway_take_is_refused(luod: LuodProcess) -> None:
    """A oneway call gets no reply: the file it took would be lost."""
    with luod.client() as c:
        _hand_off(c, "app", ["a"])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(luod.socket)
        call = {
            "method": f"{CUSTODY}.RetrieveFd",
            "parameters": {"session": "app", "name": "a", "take": True},
            "oneway": True,
        }
        sock.sendall(json.dumps(call).encode() + b"\0")
        sock.settimeout(10)
        assert sock.recv(1) == b""
    assert "a oneway call of io.luod.Custody.RetrieveFd, whose reply carries fds" in luod.log()
    with luod.client() as c:
        assert _files(c, "app") == ["a"]


def test_a_session_given_back_stays_within_its_owners_quota(
    workdir: Path, fake_kernel: str
) -> None:
    """While the reply of a RetrieveSession waits in luod the session
    counts no more: its owner may take its place, and the session does not
    come back over the quota."""
    with running_luod(workdir, fake_kernel, "--max-sessions-root=2") as luod:
        with luod.client() as c:
            os.close(c.create_delegated_session("d1"))
            os.close(c.create_delegated_session("d2"))
        luod.kexec()
        hand_back = {"method": f"{CUSTODY}.RetrieveSession", "parameters": {"session": "d1"}}
        with unread_reply(luod.socket, hand_back), luod.client() as c:
            wait_until(lambda: _sessions(c) == ["d2"], "d1 handed back")
            c.create_session("n1")
        wait_until(lambda: "event=session-lost " in luod.log(), "luod logs session-lost")
        with luod.client() as c:
            assert _sessions(c) == ["d2", "n1"]
        assert "it could not be held again: quota exceeded" in luod.log()


def _sessions(c: Client) -> list[str]:
    return sorted(s["name"] for s in c.list_sessions())


def test_a_take_waiting_when_luod_stops_stays_in_the_fd_store(pid1: FakePid1) -> None:
    """luod stopped (not a kexec) while a take's reply waits for a client
    that reads nothing: the file comes back into custody before luod hands
    custody to the service manager, so the next luod has it."""
    pid1.start()
    with pid1.client() as c:
        facts = _hand_off(c, "app", ["a", "b"])
    take = {
        "method": f"{CUSTODY}.RetrieveFd",
        "parameters": {"session": "app", "name": "a", "take": True},
    }
    with unread_reply(pid1.luod.socket, take), pid1.client() as c:
        wait_until(lambda: _files(c, "app") == ["b"], "a taken")
        pid1.stop()
    log = pid1.log()
    assert "event=fds-given-back session=app names=a " in log, log
    assert "event=stopping-custody-stays sessions=1" in log
    pid1.start()
    with pid1.client() as c:
        assert _files(c, "app") == ["a", "b"]
        _same(c, "app", facts)


def test_a_session_given_back_is_in_the_fd_store_again(pid1: FakePid1) -> None:
    """The fd store carrier: a session handed back after the kexec leaves
    the store; given back, it is pushed again, so a restarted luod has it."""
    pid1.start()
    with pid1.client() as c:
        os.close(c.create_delegated_session("own"))
    pid1.kexec()
    pid1.start()
    pid1.luod.call_unheard(f"{CUSTODY}.RetrieveSession", {"session": "own"}, "session-given-back")
    pid1.stop()
    pid1.start()
    with pid1.client() as c:
        assert _sessions(c) == ["own"]
        os.close(c.retrieve_session("own"))
        assert _sessions(c) == []


def test_a_take_waiting_when_luod_is_killed_is_held_again(pid1: FakePid1) -> None:
    """luod killed (SIGKILL) while a take's reply waits for a client that
    reads nothing: the take had ended custody in the manifest, and the file
    then existed only in the reply. The take is recorded until its reply
    has gone out, and luod's references to the files stay in the fd store
    till then: the luod started next holds them again. Before, the file was
    gone."""
    pid1.start()
    with pid1.client() as c:
        facts = _hand_off(c, "app", ["a", "b"])
        facts |= _hand_off(c, "db", ["x"])
        before = {s["name"]: s["kernelName"] for s in c.list_sessions()}
    takes = [
        {
            "method": f"{CUSTODY}.RetrieveFd",
            "parameters": {"session": "app", "name": "a", "take": True},
        },
        # The last file of its session: luod lets go of the session.
        {"method": f"{CUSTODY}.RetrieveFds", "parameters": {"session": "db", "take": True}},
    ]
    with unread_reply(pid1.luod.socket, takes[0]), unread_reply(pid1.luod.socket, takes[1]):
        with pid1.client() as c:
            wait_until(lambda: _sessions(c) == ["app"] and _files(c, "app") == ["b"], "taken")
            app = c.list_sessions("app")[0]["kernelName"]
        # What luod keeps for the takes waiting is their files' references
        # only: the sessions' own parkings are let go of at once.
        want = {parking_fdname(app), *(parking_fdname("taken." + k) for k in before.values())}
        wait_until(lambda: {n for n in pid1.names() if n.startswith("refs.")} == want, "parked")
        pid1.kill9()
    pid1.start()
    with pid1.client() as c:
        assert (_files(c, "app"), _files(c, "db")) == (["a", "b"], ["x"])
        _same(c, "app", {n: facts[n] for n in ("a", "b")})
        _same(c, "db", {"x": facts["x"]})
    log = pid1.log()
    for held in ("session=app names=a ", "session=db names=x "):
        assert f"event=fds-given-back {held}" in log, log
    assert "fds-lost" not in log
    # Nothing of the takes is left in the store: a kexec carries the two
    # sessions and nothing else.
    pid1.kexec()
    pid1.start()
    with pid1.client() as c:
        assert c.status()["reclaim"]["lost"] == []
        assert (_files(c, "app"), _files(c, "db")) == (["a", "b"], ["x"])
        _same(c, "app", {n: facts[n] for n in ("a", "b")})


def test_a_session_handed_back_when_luod_is_killed_is_held_again(pid1: FakePid1) -> None:
    """The same for a session handed back whole after the kexec
    (RetrieveSession): the fd store keeps its copy until the reply went out."""
    pid1.start()
    with pid1.client() as c:
        os.close(c.create_delegated_session("own"))
    pid1.kexec()
    pid1.start()
    hand_back = {"method": f"{CUSTODY}.RetrieveSession", "parameters": {"session": "own"}}
    with unread_reply(pid1.luod.socket, hand_back):
        with pid1.client() as c:
            wait_until(lambda: _sessions(c) == [], "own handed back")
        pid1.kill9()
    pid1.start()
    assert "event=session-given-back session=own " in pid1.log()
    with pid1.client() as c:
        assert _sessions(c) == ["own"]
        os.close(c.retrieve_session("own"))
        assert _sessions(c) == []


def test_a_take_whose_reply_went_out_is_let_go_of(pid1: FakePid1) -> None:
    """Once the reply of a take went out, its record and luod's references
    go: a luod killed after that does not hold the file again."""
    pid1.start()

    def parked() -> int:
        return sum(n.startswith("refs.") for n in pid1.names())

    with pid1.client() as c:
        _hand_off(c, "app", ["a", "b"])
        os.close(c.retrieve_fd("app", "a", take=True))
    # One parking (two store entries) for the session left, as before the
    # take: the old one went once the reply was out.
    wait_until(lambda: parked() == 2, "the references kept for the take let go of")
    pid1.kill9()
    pid1.start()
    with pid1.client() as c:
        assert _files(c, "app") == ["b"]
    assert "fds-given-back" not in pid1.log()


def test_a_take_that_cannot_be_held_again_after_a_kill_is_reported_lost(
    pid1: FakePid1,
) -> None:
    """What a restarted luod cannot hold again (here its owner's quota is
    smaller than before the kill) is in the reclaim report's lost, not
    only in the log."""
    pid1.start()
    with pid1.client() as c:
        _hand_off(c, "app", ["a", "b"])
    take = {
        "method": f"{CUSTODY}.RetrieveFd",
        "parameters": {"session": "app", "name": "a", "take": True},
    }
    with unread_reply(pid1.luod.socket, take):
        with pid1.client() as c:
            wait_until(lambda: _files(c, "app") == ["b"], "a taken")
        pid1.kill9()
    pid1.start("--max-files-root=1")
    with pid1.client() as c:
        assert c.status()["reclaim"]["lost"] == ["app/a"]
        assert _files(c, "app") == ["b"]
    log = pid1.log()
    assert "event=fds-lost session=app names=a " in log, log
    assert "quota exceeded" in log


def test_a_take_waiting_when_luod_kexecs_is_carried(luod: LuodProcess) -> None:
    """luod's own kexec (no service manager) while a take's reply waits for
    a client that reads nothing: the connections whose replies would hand
    files over are cut before the jump, and what they took is held again
    and carried (its client is gone with this userspace anyway). Before,
    the reclaim after the kexec reported it lost."""
    with luod.client() as c:
        facts = _hand_off(c, "app", ["a", "b"])
    take = {
        "method": f"{CUSTODY}.RetrieveFd",
        "parameters": {"session": "app", "name": "a", "take": True},
    }
    with unread_reply(luod.socket, take), luod.client() as c:
        wait_until(lambda: _files(c, "app") == ["b"], "a taken")
        c.call("org.varlink.service.GetInfo").close()  # a connection not cut
        luod.kexec()
    assert "event=fds-given-back session=app names=a " in luod.all_logs()
    with luod.client() as c:
        assert c.status()["reclaim"]["lost"] == []
        assert _files(c, "app") == ["a", "b"]
        _same(c, "app", facts)
