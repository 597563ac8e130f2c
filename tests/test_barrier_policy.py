"""The update barrier's policy between users, over the real socket on the
fake kernel: who may stop a live update, subscriber names per uid (root and
uid 65534 in both orders), subscriptions bounded per uid, and what a
non-root caller sees of subscribers.

Each subscriber is a forked child: as root, or dropped to uid 65534
("nobody"). It reports every event (and how its stream ended) to the test
as a JSON line over a socketpair."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from luod import daemon
from luod.client import Client, VarlinkError
from luod.manifest import Manifest, from_json, to_json
from luod.orchestrator import MAX_SUBSCRIPTIONS
from testsupport.images import fake_bzimage
from testsupport.luodproc import LuodProcess, running_luod
from testsupport.util import become, run_as, wait_until

NOBODY = 65534


def _follow(path: str, name: str, refuse: str | None, ack: bool, out: socket.socket) -> None:
    """In the child: subscribe, answer prepare and freeze (refusing `refuse`,
    or "both"), and report each event; the last line says how it ended."""

    def say(doc: dict[str, Any]) -> None:
        out.sendall(json.dumps(doc).encode() + b"\n")

    try:
        with Client(path) as events, Client(path) as acks:
            for ev in events.subscribe(name, 5):
                say(ev)
                if ack and ev["phase"] in ("prepare", "freeze"):
                    no = refuse in (ev["phase"], "both")
                    try:
                        acks.acknowledge(
                            ev["subscription"],
                            ev["update"],
                            ev["phase"],
                            no,
                            f"uid {os.getuid()} says no" if no else None,
                        )
                    except VarlinkError as e:
                        # Another's refusal ended the update first: too late.
                        assert e.short == "UnexpectedAcknowledge", e
                        say({"late": e.parameters})
        say({"end": "ended"})
    except VarlinkError as e:
        say({"end": e.short, "parameters": e.parameters})
    except OSError as e:
        say({"end": "disconnected", "reason": str(e)})


class Forked:
    """A subscriber in a child process of uid `uid`."""

    def __init__(
        self,
        luod: LuodProcess,
        uid: int,
        name: str,
        refuse: str | None = None,
        ack: bool = True,
    ) -> None:
        self.uid, self.name = uid, name
        self.lines: list[dict[str, Any]] = []
        parent, child = socket.socketpair()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child
            try:
                parent.close()
                if uid != 0:
                    become(uid)
                _follow(luod.socket, name, refuse, ack, child)
            finally:
                os._exit(0)
        child.close()
        self.sock = parent
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with self.sock.makefile("rb") as f:
            for line in f:
                self.lines.append(json.loads(line))

    @property
    def phases(self) -> list[str]:
        return [e["phase"] for e in self.lines if "phase" in e]

    @property
    def last_event(self) -> dict[str, Any]:
        return [e for e in self.lines if "phase" in e][-1]

    @property
    def end(self) -> dict[str, Any] | None:
        return self.lines[-1] if self.lines and "end" in self.lines[-1] else None

    def wait_started(self) -> dict[str, Any]:
        """The first line: the subscribed or resumed event, or the refusal."""
        wait_until(lambda: bool(self.lines), f"{self.name} (uid {self.uid}) answered")
        return self.lines[0]

    def finish(self) -> None:
        """Wait for the child to end; kill it if it still follows."""
        wait_until(lambda: self.end is not None or not self.reader.is_alive(), "stream ended")
        self.stop()

    def stop(self) -> None:
        if self.pid < 0:
            return
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self.pid = -1
        self.reader.join(5)
        self.sock.close()


def _as(uid: int, call: Callable[[Client], Any], path: str) -> Any:
    """`call` with a Client of uid `uid` in a forked child: its JSON result,
    or {"error": short name, "parameters": ...}."""

    def work() -> Any:
        with Client(path) as c:
            try:
                return call(c)
            except VarlinkError as e:
                return {"error": e.short, "parameters": e.parameters}

    return run_as(uid, work)


def _load(luod: LuodProcess) -> None:
    with luod.client() as c:
        # A command line the next kernel can take the handover with.
        image = fake_bzimage(luod.workdir / "bzImage")
        c.load_kernel(str(image), cmdline="console=ttyS0 kho=on liveupdate=on")


@pytest.fixture
def subscribers() -> Iterator[list[Forked]]:
    made: list[Forked] = []
    yield made
    for s in made:
        s.stop()


@pytest.mark.parametrize("order", ["root first", "nobody first"])
def test_nobody_refusing_does_not_stop_roots_update_nor_take_its_name(
    luod: LuodProcess, subscribers: list[Forked], order: str
) -> None:
    """nobody subscribes under the very name root's VMM uses and refuses
    prepare: root's update (not forced) goes on, nobody is still told every
    phase, and its refusal is logged with who and why."""
    uids = [0, NOBODY] if order == "root first" else [NOBODY, 0]
    for uid in uids:
        refuse = "prepare" if uid == NOBODY else None
        subscribers.append(Forked(luod, uid, "vmm", refuse=refuse))
        assert subscribers[-1].wait_started()["phase"] == "subscribed"
    root, nobody = sorted(subscribers, key=lambda s: s.uid)
    _load(luod)
    with luod.client() as c:
        out = c.update()
    assert (out["update"], out["overridden"]) == (
        1,
        ["vmm (uid 65534): refused prepare: uid 65534 says no"],
    )
    luod.wait_exit()
    for s in subscribers:
        s.finish()
    assert root.phases == ["subscribed", "prepare", "freeze"]
    assert nobody.phases == ["subscribed", "prepare", "freeze"]
    log = luod.log()
    assert "event=refusal-overridden" in log
    assert "subscriber=vmm" in log and "(uid 65534)" in log
    assert 'reason="refused prepare: uid 65534 says no"' in log
    assert 'because="this subscriber may not stop updates"' in log
    assert "event=barrier-passed update=1 overridden=1" in log


def test_after_the_kexec_nobody_cannot_take_roots_resumed(
    luod: LuodProcess, subscribers: list[Forked]
) -> None:
    """Resumed is matched by (name, uid): nobody subscribing first under the
    name root's VMM had is told `subscribed`, and root still gets `resumed`."""
    subscribers.append(Forked(luod, 0, "vmm"))
    subscribers.append(Forked(luod, NOBODY, "watcher"))
    for s in subscribers:
        assert s.wait_started()["phase"] == "subscribed"
    _load(luod)
    with luod.client() as c:
        c.update()
    luod.wait_exit()
    for s in subscribers:
        s.finish()
    luod.start()
    thief = Forked(luod, NOBODY, "vmm")
    subscribers.append(thief)
    assert thief.wait_started()["phase"] == "subscribed"
    vmm = Forked(luod, 0, "vmm")
    subscribers.append(vmm)
    assert vmm.wait_started()["phase"] == "resumed"
    watcher = Forked(luod, NOBODY, "watcher")
    subscribers.append(watcher)
    assert watcher.wait_started()["phase"] == "resumed"


@pytest.mark.parametrize("refuser", [0, NOBODY])
def test_forced_update_goes_past_a_refusal_and_logs_it(
    luod: LuodProcess, subscribers: list[Forked], refuser: int
) -> None:
    subscribers.append(Forked(luod, 0, "db"))
    subscribers.append(Forked(luod, refuser, "cache", refuse="both"))
    for s in subscribers:
        s.wait_started()
    _load(luod)
    if refuser == 0:  # root's refusal stops an update that is not forced
        with luod.client() as c, pytest.raises(VarlinkError) as e:
            c.update()
        assert (e.value.short, e.value.parameters["subscriber"]) == ("UpdateAborted", "cache")
    with luod.client() as c:
        out = c.update(force=True)
    assert out["update"] == (2 if refuser == 0 else 1)
    assert out["overridden"] == [
        f"cache (uid {refuser}): refused prepare: uid {refuser} says no",
        f"cache (uid {refuser}): refused freeze: uid {refuser} says no",
    ]
    luod.wait_exit()
    for s in subscribers:
        s.finish()
        assert s.phases[-2:] == ["prepare", "freeze"]
    log = luod.log()
    assert 'because="the update is forced"' in log
    assert "subscriber=cache" in log
    for phase in ("prepare", "freeze"):
        assert f'reason="refused {phase}: uid {refuser} says no"' in log


def test_update_veto_option_lets_a_user_stop_updates(
    workdir: Path, fake_kernel: str, subscribers: list[Forked]
) -> None:
    with running_luod(workdir, fake_kernel, f"--update-veto=nobody,{NOBODY}") as luod:
        subscribers.append(Forked(luod, NOBODY, "vmm", refuse="freeze"))
        subscribers[0].wait_started()
        _load(luod)
        with luod.client() as c, pytest.raises(VarlinkError) as e:
            c.update()
        assert e.value.parameters == {
            "update": 1,
            "subscriber": "vmm",
            "reason": "refused freeze: uid 65534 says no",
        }
        wait_until(lambda: subscribers[0].phases[-1] == "aborted", "told aborted")
        with luod.client() as c:
            assert c.update(force=True)["update"] == 2
        luod.wait_exit()


def test_subscriptions_are_bounded_per_uid(luod: LuodProcess, subscribers: list[Forked]) -> None:
    for i in range(MAX_SUBSCRIPTIONS):
        subscribers.append(Forked(luod, NOBODY, f"s{i}"))
    for s in subscribers:
        assert s.wait_started()["phase"] == "subscribed"
    over = Forked(luod, NOBODY, "one-more")
    subscribers.append(over)
    over.finish()
    assert over.lines == [
        {
            "end": "QuotaExceeded",
            "parameters": {"resource": "subscriptions", "limit": MAX_SUBSCRIPTIONS},
        }
    ]
    assert "uid 65534" in luod.log() and "QuotaExceeded" in luod.log()
    # Root's pool is its own.
    for name in ("s0", "one-more"):
        subscribers.append(Forked(luod, 0, name))
        assert subscribers[-1].wait_started()["phase"] == "subscribed"
    # One of nobody's going away frees its place.
    subscribers[0].stop()
    subscribers.remove(subscribers[0])
    again = Forked(luod, NOBODY, "one-more")
    subscribers.append(again)

    def subscribed() -> bool:
        again.wait_started()
        return again.lines[0].get("phase") == "subscribed"

    # The departure is noticed when its connection closes: retry until then.
    for _ in range(50):
        if subscribed():
            break
        again.stop()
        subscribers.remove(again)
        again = Forked(luod, NOBODY, "one-more")
        subscribers.append(again)
    assert again.lines[0]["phase"] == "subscribed"


def _told(sub: Forked, phase: str) -> Callable[[], bool]:
    return lambda: sub.phases[-1] == phase


def test_root_acknowledging_for_nobody_is_logged_as_such(
    luod: LuodProcess, subscribers: list[Forked]
) -> None:
    """Root may answer for another uid's subscription; the log said
    "acknowledged" (refused, with a reason) as if its owner had, with no
    word of root. It says who answered, and for whom."""
    nobody = Forked(luod, NOBODY, "vmm", ack=False)
    subscribers.append(nobody)
    nobody.wait_started()
    _load(luod)
    done: list[dict[str, Any]] = []
    with luod.client() as c:
        update = threading.Thread(target=lambda: done.append(c.update()), daemon=True)
        update.start()
        with luod.client() as root:
            for phase in ("prepare", "freeze"):
                wait_until(_told(nobody, phase), f"nobody told {phase}")
                ev = nobody.last_event
                root.acknowledge(ev["subscription"], ev["update"], phase, True, "root says no")
        update.join(10)
    assert done[0]["overridden"] == [
        f"vmm (uid {NOBODY}): refused {phase}: root says no" for phase in ("prepare", "freeze")
    ]
    luod.wait_exit()
    acked = [line for line in luod.log().splitlines() if "event=acknowledged" in line]
    assert len(acked) == 2
    for line in acked:
        assert f"for={NOBODY}" in line and "(uid 0)" in line and f"(uid {NOBODY})" in line, line


def test_non_root_sees_only_its_own_subscribers(
    luod: LuodProcess, subscribers: list[Forked]
) -> None:
    subscribers.append(Forked(luod, 0, "vmm"))
    subscribers.append(Forked(luod, NOBODY, "mine"))
    for s in subscribers:
        s.wait_started()
    theirs = _as(
        NOBODY,
        lambda c: [(s["name"], s["owner"]["uid"]) for s in c.status()["subscribers"]],
        luod.socket,
    )
    assert theirs == [["mine", NOBODY]]
    with luod.client() as c:
        assert sorted((s["name"], s["owner"]["uid"]) for s in c.status()["subscribers"]) == [
            ("mine", NOBODY),
            ("vmm", 0),
        ]
    # Root's subscription id does not let nobody answer for it.
    sid = subscribers[0].lines[0]["subscription"]
    denied = _as(NOBODY, lambda c: c.acknowledge(sid, 1, "prepare", True, "no"), luod.socket)
    assert denied == {"error": "PermissionDenied", "parameters": {"subscription": sid}}


def test_nobody_is_not_told_who_stopped_roots_update(
    luod: LuodProcess, subscribers: list[Forked]
) -> None:
    subscribers.append(Forked(luod, 0, "vmm", refuse="prepare"))
    subscribers.append(Forked(luod, NOBODY, "mine"))
    for s in subscribers:
        s.wait_started()
    _load(luod)
    with luod.client() as c, pytest.raises(VarlinkError) as e:
        c.update()
    assert e.value.parameters["reason"] == "refused prepare: uid 0 says no"
    root, nobody = subscribers
    wait_until(lambda: root.phases[-1] == nobody.phases[-1] == "aborted", "both told aborted")
    assert root.last_event["reason"] == "vmm: refused prepare: uid 0 says no"
    assert nobody.last_event["reason"] == "stopped by a subscriber of another user"
    last = _as(NOBODY, lambda c: c.status()["lastUpdate"], luod.socket)
    assert (last["ok"], last["subscriber"], last["reason"]) == (
        False,
        None,
        "stopped by a subscriber of another user",
    )
    with luod.client() as c:
        assert c.status()["lastUpdate"]["subscriber"] == "vmm"


def test_manifest_carries_subscribers_by_name_and_uid() -> None:
    pairs = {("vmm", 0), ("vmm", NOBODY), ("db", 1000)}
    raw = to_json(Manifest(sessions=[], subscribers=pairs))
    assert from_json(raw).subscribers == pairs
    doc = json.loads(raw)
    assert doc["subscribers"] == [
        {"name": "db", "uid": 1000},
        {"name": "vmm", "uid": 0},
        {"name": "vmm", "uid": NOBODY},
    ]


def test_options_name_users_and_limits() -> None:
    args = daemon.build_parser().parse_args(
        ["--update-veto=nobody,1001", "--update-veto", "0", "--max-subscriptions-per-user=4"]
    )
    policy = daemon.update_policy(args)
    assert policy.veto_uids == frozenset({NOBODY, 1001, 0})
    assert (policy.max_subscriptions, policy.max_subscriptions_root) == (4, 256)
    with pytest.raises(argparse.ArgumentTypeError, match="no user named 'no-such-user'"):
        daemon.parse_users("no-such-user")
