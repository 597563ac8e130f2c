"""Live-update orchestration over the real socket, on the fake kernel:
load, subscribers, the barrier, aborts, resumed, delegated sessions."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from luod.client import Client, VarlinkError
from testsupport.fakekernel import FakeBackend
from testsupport.images import fake_bzimage
from testsupport.luodproc import LuodProcess
from testsupport.util import make_memfd, wait_until


class Subscriber(threading.Thread):
    """A workload following updates in a thread; acknowledges unless told not to."""

    def __init__(
        self,
        luod: LuodProcess,
        name: str,
        deadline: float = 5.0,
        ack: bool = True,
        refuse: str | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self.luod, self.name_, self.deadline, self.ack, self.refuse = (
            luod,
            name,
            deadline,
            ack,
            refuse,
        )
        self.events: list[dict[str, Any]] = []
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.client = Client(luod.socket)

    def run(self) -> None:
        try:
            with Client(self.luod.socket) as acks:
                for ev in self.client.subscribe(self.name_, self.deadline):
                    self.events.append(ev)
                    self.ready.set()
                    if ev["phase"] in ("prepare", "freeze") and self.ack:
                        refuse = ev["phase"] == self.refuse
                        acks.acknowledge(
                            ev["subscription"],
                            ev["update"],
                            ev["phase"],
                            refuse,
                            "busy" if refuse else None,
                        )
        except (VarlinkError, OSError) as e:
            self.error = e

    def phases(self) -> list[str]:
        return [e["phase"] for e in self.events]

    def stop(self) -> None:
        self.client.sock.shutdown(socket.SHUT_RDWR)
        self.join(5)


def _wait_unsubscribed(luod: LuodProcess, name: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with luod.client() as c:
            if name not in [s["name"] for s in c.status()["subscribers"]]:
                return
        time.sleep(0.05)
    raise AssertionError(f"{name} still subscribed")


def _load(luod: LuodProcess) -> None:
    with luod.client() as c:
        c.load_kernel(
            str(fake_bzimage(luod.workdir / "bzImage")),
            cmdline="console=ttyS0 kho=on liveupdate=on",
        )


def test_load_unload_and_status(luod: LuodProcess, workdir: Path) -> None:
    with luod.client() as c:
        st = c.status()
        assert (st["kernelLoaded"], st["loadedKernel"]) == (False, None)
        with pytest.raises(VarlinkError) as e:
            c.load_kernel("/etc/passwd")
        assert e.value.short == "KernelUnusable"
        assert e.value.parameters["parameter"] == "kernel"
        assert "not an x86 bzImage" in e.value.parameters["reason"]
        with pytest.raises(VarlinkError) as e:
            c.load_kernel(str(workdir / "missing"))
        assert "cannot open it" in e.value.parameters["reason"]
        with pytest.raises(VarlinkError) as e:
            c.load_kernel(str(fake_bzimage(workdir / "k")), initrd=str(workdir / "no-initrd"))
        assert e.value.parameters["parameter"] == "initrd"
        with pytest.raises(VarlinkError) as e:
            c.update()
        assert e.value.short == "NotReady"
        assert "no kernel is loaded" in e.value.parameters["reason"]
        loaded = c.load_kernel(str(workdir / "k"), cmdline="quiet kho=on liveupdate=on")
        assert loaded["commandLine"] == "quiet kho=on liveupdate=on"
        st = c.status()
        assert st["kernelLoaded"] is True and st["loadedKernel"]["kernel"] == str(workdir / "k")
        c.unload_kernel()
        assert c.status()["kernelLoaded"] is False


def test_two_subscribers_acknowledge_update_happens_and_resumed(luod: LuodProcess) -> None:
    with luod.client() as c:
        c.preserve_fd("db-state", "wal", make_memfd(b"wal" * 1000), create_session=True)
    subs = [Subscriber(luod, "db"), Subscriber(luod, "cache")]
    for s in subs:
        s.start()
        assert s.ready.wait(10)
    with luod.client() as c:
        st = c.status()
        assert sorted(s["name"] for s in st["subscribers"]) == ["cache", "db"]
    _load(luod)
    with luod.client() as c:
        out = c.update()
    assert out["update"] == 1
    luod.wait_exit()
    for s in subs:
        s.join(10)
        assert s.phases() == ["subscribed", "prepare", "freeze"], s.events
    luod.start()
    # After the kexec: the same names are told what came with them.
    again = [Subscriber(luod, "db"), Subscriber(luod, "newcomer")]
    for s in again:
        s.start()
        assert s.ready.wait(10)
    resumed, fresh = again[0].events[0], again[1].events[0]
    assert resumed["phase"] == "resumed"
    assert resumed["kexecCount"] == 1
    assert resumed["sessions"] == ["db-state"]
    assert fresh["phase"] == "subscribed"
    for s in again:
        s.stop()
    assert "event=barrier-passed update=1" in luod.all_logs()


def test_missed_deadline_aborts_nothing_lost_retry_succeeds(luod: LuodProcess) -> None:
    with luod.client() as c:
        c.preserve_fd("keep", "x", make_memfd(b"keep me"), create_session=True)
        before = c.list_sessions()
    good = Subscriber(luod, "good")
    slow = Subscriber(luod, "slow", deadline=0.5, ack=False)
    for s in (good, slow):
        s.start()
        assert s.ready.wait(10)
    _load(luod)
    with luod.client() as c, pytest.raises(VarlinkError) as e:
        c.update()
    assert e.value.short == "UpdateAborted"
    assert e.value.parameters["subscriber"] == "slow"
    assert e.value.parameters["reason"] == "did not acknowledge prepare within 0.5s"
    wait_until(lambda: good.phases()[-1] == "aborted", "good's last phase is aborted")
    assert "slow: did not acknowledge prepare" in good.events[-1]["reason"]
    with luod.client() as c:
        assert c.list_sessions() == before
        st = c.status()
        assert st["lastUpdate"]["ok"] is False and st["lastUpdate"]["subscriber"] == "slow"
    # The slow one goes away; the same update is tried again and passes.
    slow.stop()
    _wait_unsubscribed(luod, "slow")
    with luod.client() as c:
        assert c.update()["update"] == 2
    luod.wait_exit()
    luod.start()
    with luod.client() as c:
        assert [s["name"] for s in c.list_sessions()] == ["keep"]


def test_refusal_and_disconnect_abort(luod: LuodProcess) -> None:
    _load(luod)
    refuser = Subscriber(luod, "refuser", refuse="freeze")
    refuser.start()
    assert refuser.ready.wait(10)
    with luod.client() as c, pytest.raises(VarlinkError) as e:
        c.update()
    assert (e.value.parameters["subscriber"], e.value.parameters["reason"]) == (
        "refuser",
        "refused freeze: busy",
    )
    refuser.stop()
    _wait_unsubscribed(luod, "refuser")
    # A subscriber that goes away during the update aborts it.
    leaver = Subscriber(luod, "leaver", ack=False)
    leaver.start()
    assert leaver.ready.wait(10)
    threading.Timer(0.3, leaver.stop).start()
    with luod.client() as c, pytest.raises(VarlinkError) as e:
        c.update()
    assert e.value.parameters["subscriber"] == "leaver"
    assert e.value.parameters["reason"] == "disconnected during prepare"


def test_acknowledge_errors(luod: LuodProcess) -> None:
    sub = Subscriber(luod, "x", ack=False)
    sub.start()
    assert sub.ready.wait(10)
    sid = sub.events[0]["subscription"]
    with luod.client() as c:
        for args, error in (
            ((sid, 1, "prepare"), "UnexpectedAcknowledge"),
            (("nope", 1, "prepare"), "NoSuchSubscription"),
            ((sid, 1, "resumed"), "UnexpectedAcknowledge"),
        ):
            with pytest.raises(VarlinkError) as e:
                c.acknowledge(*args)
            assert e.value.short == error
        with pytest.raises(VarlinkError) as e:
            next(iter(c.subscribe("x")))
        assert e.value.short == "SubscriptionExists"
    with luod.client() as c, pytest.raises(VarlinkError) as e:
        next(iter(c.subscribe("y", deadline=10_000)))
    assert e.value.short == "InvalidDeadline"
    sub.stop()


def test_delegated_session_survives_client_and_kexec(luod: LuodProcess, fake_kernel: str) -> None:
    kernel = FakeBackend(fake_kernel)
    data = os.urandom(10_000)
    with luod.client() as c:
        sfd = c.create_delegated_session("vmm")
        kernel.preserve_fd(sfd, make_memfd(data), 5)
        os.close(sfd)  # the client "crashes": luod still holds the session
        (s,) = c.list_sessions()
        assert (s["kind"], s["state"]) == ("delegated", "outgoing")
        # A restarted client gets its session back and goes on preserving.
        sfd = c.retrieve_session("vmm")
        kernel.preserve_fd(sfd, make_memfd(b"more"), 6)
        os.close(sfd)
    luod.kexec()
    with luod.client() as c:
        sfd = c.retrieve_session("vmm")
        assert c.list_sessions() == []
    fd = kernel.retrieve_fd(sfd, 5)
    assert os.pread(fd, 20_000, 0) == data
    assert os.pread(kernel.retrieve_fd(sfd, 6), 10, 0) == b"more"
    kernel.finish_session(sfd)


def test_a_long_refusal_reason_does_not_flood_the_log(luod: LuodProcess) -> None:
    """Acknowledge's reason was logged whole, as was the abort it caused,
    and carried whole into the Update reply and lastUpdate: a subscriber
    refusing with a reason of a megabyte wrote megabytes into luod's log.
    It is kept to its first characters and its length, as every string a
    caller sends is in the log."""
    _load(luod)
    reason = "r" * (1 << 20)
    subscriber = Client(luod.socket)
    events = subscriber.subscribe("long")
    assert next(events)["phase"] == "subscribed"

    def refuse() -> None:
        with Client(luod.socket) as acks:
            ev = next(events)
            acks.acknowledge(ev["subscription"], ev["update"], ev["phase"], True, reason)

    refuser = threading.Thread(target=refuse, daemon=True)
    refuser.start()
    before = len(luod.log())
    with luod.client() as c, pytest.raises(VarlinkError) as e:
        c.update()
    refuser.join(10)
    assert len(luod.log()) - before < 16384
    said = e.value.parameters["reason"]
    assert said.startswith("refused prepare: rrrr") and said.endswith(f"({len(reason)} characters)")
    assert len(said) < 4096
    with luod.client() as c:
        assert len(c.status()["lastUpdate"]["reason"]) < 4096
    subscriber.close()
