"""Crash safety (issue 11): luod killed with SIGKILL at every named step of
every custody change, on the fake kernel under the fake PID 1 (fd-store
carrier), then restarted.

Every case hands off a few sessions of known bytes (and adopts one), then
starts luod with LUOD_TEST_CRASH_AT=STEP (testsupport.crashhook) and makes
the call that passes STEP, or the fake kexec whose reclaim and
preserve-again pass it, and asserts that luod died there (-9). The luod
started after it must hold:

(a) every acknowledged file listed and retrievable byte-identical by copy
    as soon as it is READY (no NotReady);
(b) nothing listed that cannot be retrieved: the listing is exactly what
    was acknowledged (plus the call in flight, see d);
(c) the fake kernel's sessions are luod's sessions, each with exactly the
    tokens its manifest names (ListSessions, and the manifest in the store);
    the store holds nothing luod does not name;
(d) the call in flight at the kill fully done or fully absent;
(e) a further hand-off into the same sessions works (no "token is used
    already");
(f) the next (fake) kexec carries everything byte-identical, and the
    reclaim report says lost == [].

How long after each restart every file was retrievable is printed (-s, or
at the end of the module's run).

test_kill_in_recovery kills luod a second time, in the recovery from the
first kill (taking references back, rebuilding a half-changed session),
and asks the same of the start after it: recovery is idempotent.

The three regression tests at the end are named after the issue's three
failures; they kill luod after a call into the fake kernel
(testsupport.fakepid1 --kill-after), which needs no hook in luod, so they
fail on the luod before issue 11 as they should.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import subprocess
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import pytest

from luod import crashpoint
from luod.carriers.fdstore import MANIFEST_NAMES, fdname_for
from luod.carriers.slots import newest
from luod.client import Client
from luod.manifest import from_json
from testsupport.fakekernel import FakeBackend
from testsupport.fakepid1 import CRASH_ENV, FakePid1
from testsupport.util import make_memfd, wait_until

# --- what is held, as the test knows it ------------------------------------------

ADOPTED_TOKEN = 7  # where a client preserves its own file in its own session
JOURNAL_NAME = "luod-journal"  # the fd store's journal memfd (issue 11's plan)
CALL_TIMEOUT = 10.0  # a call to a luod that died must not hang the test


def data_for(session: str, name: str, size: int) -> bytes:
    return random.Random(f"{session}/{name}/{size}").randbytes(size)


@dataclasses.dataclass
class World:
    """What luod acknowledged: managed sessions with their files' bytes,
    adopted sessions with the bytes at ADOPTED_TOKEN, delegated sessions."""

    managed: dict[str, dict[str, bytes]] = dataclasses.field(default_factory=dict)
    adopted: dict[str, bytes] = dataclasses.field(default_factory=dict)
    delegated: set[str] = dataclasses.field(default_factory=set)

    def copy(self) -> World:
        return World(
            {s: dict(f) for s, f in self.managed.items()}, dict(self.adopted), set(self.delegated)
        )

    def shape(self) -> dict[str, tuple[str, frozenset[str]]]:
        """Session -> (kind, file names): what ListSessions must say."""
        out = {s: ("managed", frozenset(f)) for s, f in self.managed.items()}
        out.update({s: ("adopted", frozenset()) for s in self.adopted})
        out.update({s: ("delegated", frozenset()) for s in self.delegated})
        return out

    def files(self) -> int:
        return sum(len(f) for f in self.managed.values())


def listed_shape(listed: list[dict[str, Any]]) -> dict[str, tuple[str, frozenset[str]]]:
    names = [s["name"] for s in listed]
    assert len(names) == len(set(names)), f"a session listed twice: {names}"
    return {s["name"]: (s["kind"], frozenset(f["name"] for f in s["files"])) for s in listed}


def parking_fdname(kernel_name: str) -> str:
    """The FDNAME of both ends of the parking of luod's references to the
    files of a kernel session: refs.<kernel name, percent-encoded as
    fdname_for() does> (spelt out here, so that this module also imports on
    a luod without it)."""
    return "refs." + fdname_for(kernel_name).removeprefix("session.")


def contents(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    out = bytearray()
    while len(out) < size:
        chunk = os.pread(fd, size - len(out), len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def hand_off(
    c: Client, session: str, files: dict[str, bytes], create: bool = False, batch: bool = True
) -> None:
    fds = [(name, make_memfd(data, position=len(data) // 3)) for name, data in files.items()]
    try:
        if batch:
            c.preserve_fds(session, fds, create_session=create)
        else:
            for name, fd in fds:
                c.preserve_fd(session, name, fd, create_session=create)
    finally:
        for _name, fd in fds:
            os.close(fd)


def own_session(kernel: FakeBackend, name: str, data: bytes) -> int:
    """A session the client made itself, `data` at ADOPTED_TOKEN: its fd."""
    sfd = kernel.create_session(name)
    mfd = make_memfd(data)
    try:
        kernel.preserve_fd(sfd, mfd, ADOPTED_TOKEN)
    finally:
        os.close(mfd)
    return sfd


BASE = {"app": {"a": 12_293, "b": 70_001, "c": 17}, "db": {"x": 100_000}, "cache": {"p": 10}}


def populate(pid1: FakePid1) -> World:
    """luod started; three managed sessions (one file handed off alone) and
    an adopted one acknowledged."""
    pid1.start()
    world = World()
    with pid1.client() as c:
        for session, sizes in BASE.items():
            files = {n: data_for(session, n, size) for n, size in sizes.items()}
            hand_off(c, session, files, create=True, batch=len(files) > 1)
            world.managed[session] = files
        data = data_for("client-own", "", 300)
        sfd = own_session(pid1.kernel, "client-own", data)
        try:
            c.adopt_session(sfd)
        finally:
            os.close(sfd)
        world.adopted["client-own"] = data
    return world


# --- the checks ---------------------------------------------------------------------


def check_listing(c: Client, world: World) -> None:
    """(b): exactly what was acknowledged is listed."""
    assert listed_shape(c.list_sessions()) == world.shape()


def retrieve_all(c: Client, world: World) -> None:
    """(a): every acknowledged file, copied, byte-identical."""
    for session, files in world.managed.items():
        for name, data in files.items():
            fd = c.retrieve_fd(session, name)
            try:
                assert contents(fd) == data, f"{session}/{name} is not what was handed off"
            finally:
                os.close(fd)


def kexec_loses_nothing(pid1: FakePid1, world: World) -> None:
    """A kexec and luod's start after it: nothing reported lost, (b) and
    (a) as the world has them."""
    pid1.kexec()
    pid1.start()
    with pid1.client() as c:
        assert c.status()["reclaim"]["lost"] == []
        check_listing(c, world)
        retrieve_all(c, world)


def retrieve_adopted(pid1: FakePid1, c: Client, world: World) -> None:
    """After a kexec: each adopted session handed back (custody ends), its
    file intact."""
    for session, data in list(world.adopted.items()):
        del world.adopted[session]
        sfd = c.retrieve_session(session)
        try:
            mfd = pid1.kernel.retrieve_fd(sfd, ADOPTED_TOKEN)
            try:
                assert contents(mfd) == data, f"{session}: the adopted session's file changed"
            finally:
                os.close(mfd)
        finally:
            os.close(sfd)


def wait_preserved_again(c: Client) -> None:
    def done() -> bool:
        reclaim = c.status().get("reclaim") or {}
        return reclaim.get("preservedAgainUSec") is not None

    wait_until(done, "every session that came over preserved again")


def stored_manifest(pid1: FakePid1) -> dict[str, tuple[str, str, list[int]]]:
    """The newest manifest in the store: session -> (kind, kernel name, tokens)."""
    found = newest([(e.name, e.fd) for e in pid1.entries() if e.name in MANIFEST_NAMES])
    assert found is not None, "no manifest in the fd store"
    # The base, and the changes logged after it (luod before issue 12: none).
    records = getattr(found.read, "records", None)
    m = from_json(found.read.payload, records) if records else from_json(found.read.payload)
    return {
        s.name: (s.kind.value, s.kernel_name, sorted(f.token for f in s.files.values()))
        for s in m.sessions
    }


def disagreements(
    pid1: FakePid1, c: Client, adopted: Collection[str], kernel_only: bool = False
) -> list[str]:
    """Where the kernel, the fd store and the manifest in it differ from
    what luod lists, one line each (orphans, missing or extra tokens);
    `adopted`: the adopted sessions whose client preserved a file at
    ADOPTED_TOKEN. `kernel_only`: the kernel's sessions only."""
    pid1.settle()
    listed = c.list_sessions()
    snap = pid1.kernel.snapshot()
    out: list[str] = []

    def tokens(s: dict[str, Any]) -> list[int]:
        return sorted(f["token"] for f in s["files"])

    def in_kernel(s: dict[str, Any]) -> list[int]:
        """What the kernel holds: a managed session's files; in an adopted
        one, what its client preserved itself."""
        return [ADOPTED_TOKEN] if s["name"] in adopted else tokens(s)

    for state, kernel in (("outgoing", snap["outgoing"]), ("incoming", snap["incoming"])):
        want = {s["kernelName"]: in_kernel(s) for s in listed if s["state"] == state}
        have = {k: v["tokens"] for k, v in kernel.items()}
        for k in sorted(set(want) | set(have)):
            if k not in want:
                out.append(f"the kernel holds {state} session {k} {have[k]}, luod lists none")
            elif k not in have:
                out.append(f"luod lists {state} session {k}, the kernel holds none")
            elif have[k] != want[k]:
                out.append(f"{state} session {k}: the kernel holds {have[k]}, luod lists {want[k]}")
    if kernel_only:
        return out
    manifest = stored_manifest(pid1)
    lists = {s["name"]: (s["kind"], s["kernelName"], tokens(s)) for s in listed}
    for name in sorted(set(manifest) | set(lists)):
        if manifest.get(name) != lists.get(name):
            out.append(
                f"session {name}: the manifest says {manifest.get(name)}, luod lists {lists.get(name)}"
            )
    names = pid1.names()
    want_names = [fdname_for(s["kernelName"]) for s in listed]
    # Two ends per parking: one per managed session holding files.
    want_names += [
        parking_fdname(s["kernelName"])
        for s in listed
        if s["kind"] == "managed" and s["files"]
        for _end in range(2)
    ]
    for n in sorted(set(names) | set(want_names)):
        if n in MANIFEST_NAMES or n == JOURNAL_NAME:
            continue
        if names.count(n) != want_names.count(n):
            out.append(
                f"the fd store holds {names.count(n)} of {n}, luod names {want_names.count(n)}"
            )
    if len([n for n in names if n in MANIFEST_NAMES]) != 1:
        out.append(f"the fd store does not hold exactly one manifest: {names}")
    if names.count(JOURNAL_NAME) > 1:
        out.append(f"the fd store holds {JOURNAL_NAME} {names.count(JOURNAL_NAME)} times")
    return out


def check_kernel_agrees(pid1: FakePid1, c: Client, world: World) -> None:
    """(c): the kernel holds luod's sessions and nothing else, each with
    exactly the manifest's tokens; the store holds nothing luod does not name."""
    assert disagreements(pid1, c, world.adopted) == []


def check_logs(pid1: FakePid1) -> None:
    logs = pid1.all_logs()
    for event in ("fd-lost", "session-lost", "represerve-failed", "finish-failed"):
        assert f"event={event}" not in logs, f"luod logged {event}"


# --- the calls in flight -------------------------------------------------------------


@dataclasses.dataclass
class Action:
    """The call luod is killed in. `run` makes it, putting into its last
    argument the fds the client holds until it knows the outcome; `done`
    is what it changes when it went through. `kexec`: the call is made
    after a (fake) kexec; without a call, luod is killed in its start, in
    preserving again or by its grace timer (after a kexec), or in its start
    after a restart in the same boot (without one). `args`: luod's
    arguments."""

    run: Callable[[FakePid1, Client, list[int]], None] | None = None
    done: Callable[[World], object] | None = None
    kexec: bool = False
    args: tuple[str, ...] = ()


NEW = {"n1": data_for("new", "n1", 3000), "n2": data_for("new", "n2", 40)}
D = data_for("app", "d", 9000)
E = data_for("app", "e", 1)
ADOPT_ME = data_for("adopt-me", "", 64)


def _create(pid1: FakePid1, c: Client, held: list[int]) -> None:
    c.create_session("new")


def _handoff_create(pid1: FakePid1, c: Client, held: list[int]) -> None:
    hand_off(c, "new", NEW, create=True)


def _delegated(pid1: FakePid1, c: Client, held: list[int]) -> None:
    os.close(c.create_delegated_session("deleg"))


def _handoff(pid1: FakePid1, c: Client, held: list[int]) -> None:
    hand_off(c, "app", {"d": D}, batch=False)


def _handoff_batch(pid1: FakePid1, c: Client, held: list[int]) -> None:
    hand_off(c, "app", {"d": D, "e": E})


def _take(pid1: FakePid1, c: Client, held: list[int]) -> None:
    os.close(c.retrieve_fd("app", "a", take=True))


def _take_last(pid1: FakePid1, c: Client, held: list[int]) -> None:
    os.close(c.retrieve_fd("db", "x", take=True))


def _adopt(pid1: FakePid1, c: Client, held: list[int]) -> None:
    sfd = own_session(pid1.kernel, "adopt-me", ADOPT_ME)
    held.append(sfd)
    c.adopt_session(sfd)


def _hand_back(pid1: FakePid1, c: Client, held: list[int]) -> None:
    os.close(c.retrieve_session("client-own"))


def _discard(pid1: FakePid1, c: Client, held: list[int]) -> None:
    c.discard_session("db")


def _release_all(w: World) -> None:
    w.managed.clear()
    w.adopted.clear()


def _set_new(w: World, files: dict[str, bytes]) -> None:
    w.managed["new"] = dict(files)


ACTIONS: dict[str, Action] = {
    "create": Action(_create, lambda w: _set_new(w, {})),
    "handoff-create": Action(_handoff_create, lambda w: _set_new(w, NEW)),
    "delegated": Action(_delegated, lambda w: w.delegated.add("deleg")),
    "handoff": Action(_handoff, lambda w: w.managed["app"].update(d=D)),
    "handoff-batch": Action(_handoff_batch, lambda w: w.managed["app"].update(d=D, e=E)),
    "take": Action(_take, lambda w: w.managed["app"].pop("a")),
    "take-after-kexec": Action(_take, lambda w: w.managed["app"].pop("a"), kexec=True),
    "take-last": Action(_take_last, lambda w: w.managed.pop("db")),
    "adopt": Action(_adopt, lambda w: w.adopted.update({"adopt-me": ADOPT_ME})),
    "discard": Action(_discard, lambda w: w.managed.pop("db")),
    "hand-back": Action(_hand_back, lambda w: w.adopted.pop("client-own"), kexec=True),
    "kexec": Action(kexec=True),
    # Killed in its start after a restart in the same boot.
    "restart": Action(),
    # Nobody claims what came over the kexec: the grace timer releases it all.
    "grace": Action(done=_release_all, kexec=True, args=("--grace=0.5s",)),
}

# The calls that end custody of what their reply carries.
TAKES = ("take", "take-after-kexec", "take-last", "hand-back")

# (LUOD_TEST_CRASH_AT, action): every step at least once.
CASES: list[tuple[str, str]] = [
    *[(s, a) for s in ("create.kernel", "create.held") for a in ("create", "handoff-create")],
    *[(s, "delegated") for s in ("create.kernel", "create.held")],
    *[
        (s, a)
        for s in ("handoff.intent", "handoff.preserved", "handoff.kept", "handoff.committed")
        for a in ("handoff", "handoff-batch", "handoff-create")
    ],
    *[(s, "take") for s in ("take.intent", "take.dropped", "take.represerved", "take.committed")],
    ("take.represerved", "take-after-kexec"),
    ("adopt.held", "adopt"),
    *[("release.committed", a) for a in ("discard", "take-last", "hand-back", "grace")],
    ("reclaim.refs", "restart"),
    ("reclaim.retrieved", "kexec"),
    *[
        (s, "kexec")
        for s in ("again.kept", "again.finished", "again.represerved", "again.committed")
    ],
    # Killed preserving the second session again, the first one done.
    ("again.finished:2", "kexec"),
    ("again.committed:2", "kexec"),
]


def resolve(shape: dict[str, tuple[str, frozenset[str]]], world: World, action: Action) -> str:
    """(d): the call in flight is fully done or fully absent; `world`
    becomes what luod holds now. Returns which."""
    if action.done is None:
        assert shape == world.shape(), "what luod lists is not what it acknowledged"
        return "-"
    after = world.copy()
    action.done(after)
    if shape == after.shape():
        world.managed, world.adopted, world.delegated = (
            after.managed,
            after.adopted,
            after.delegated,
        )
        return "done"
    assert shape == world.shape(), (
        f"the call in flight is neither fully done nor fully absent:\n  listed {shape}\n"
        f"  before {world.shape()}\n  after  {after.shape()}"
    )
    return "absent"


# --- killing luod -------------------------------------------------------------------


def poke(pid1: FakePid1) -> None:
    """A call that makes luod finish preserving again (Check), if it is
    still alive; whatever happens to it."""
    with contextlib.suppress(OSError), pid1.client() as c:
        c.sock.settimeout(CALL_TIMEOUT)
        c.check()


def expect_killed(pid1: FakePid1, where: str) -> None:
    """luod died of SIGKILL (the hook, at `where`), not otherwise."""
    try:
        code = pid1.wait_exit(CALL_TIMEOUT)
    except subprocess.TimeoutExpired:
        pid1.kill9()
        pytest.fail(f"luod was never killed at {where}: the step was not reached")
    assert code == -9, f"luod exited with {code}, not killed at {where}:\n{pid1.log()}"


def kill_in_call(pid1: FakePid1, action: Action, where: str) -> list[int]:
    """Make the call of `action` on the luod running, which dies in it."""
    assert action.run is not None
    held: list[int] = []
    with pid1.client() as c:
        c.sock.settimeout(CALL_TIMEOUT)
        try:
            action.run(pid1, c, held)
        except (ConnectionError, TimeoutError):
            pass
        else:
            pid1.kill9()
            pytest.fail(f"the call was answered: luod was not killed at {where}")
    expect_killed(pid1, where)
    return held


def kill_after_kexec(pid1: FakePid1, where: str, *args: str, **how: Any) -> None:
    """A fake kexec, then a luod that dies in its start or in preserving
    again (with a call that makes it finish that, if need be)."""
    pid1.kexec()
    if pid1.launch(*args, **how):
        with contextlib.suppress(subprocess.TimeoutExpired):
            pid1.wait_exit(1.0)
        if pid1.luod.proc is not None and pid1.luod.proc.poll() is None:
            poke(pid1)
    expect_killed(pid1, where)


def kill_in_restart(pid1: FakePid1, where: str) -> None:
    """luod killed and started again in the same boot, dying in its start."""
    pid1.kill9()
    start_killed_at(pid1, where)


def start_killed_at(pid1: FakePid1, where: str) -> None:
    """luod started, and killed at `where` before it got ready."""
    if pid1.launch(env={CRASH_ENV: where}):
        pid1.kill9()
        pytest.fail(f"luod got ready: it was not killed at {where}")
    expect_killed(pid1, where)


@dataclasses.dataclass
class Restart:
    ready: float  # seconds from the start to READY=1
    retrievable: float  # from the start until every file was copied


def restart_and_retrieve(pid1: FakePid1, world: World, action: Action | None = None) -> str:
    """Start luod; at once (a) + (b) + (d). Returns the call's outcome."""
    pid1.start()
    with pid1.client() as c:
        outcome = resolve(listed_shape(c.list_sessions()), world, action or Action())
        retrieve_all(c, world)
    return outcome


def timed_restart(
    pid1: FakePid1, world: World, action: Action | None = None
) -> tuple[str, Restart]:
    outcome = restart_and_retrieve(pid1, world, action)
    now = time.monotonic()
    return outcome, Restart(pid1.ready_at - pid1.spawned_at, now - pid1.spawned_at)


# --- the cases ------------------------------------------------------------------------

FIGURES: list[tuple[str, str, str, Restart, Restart]] = []


@pytest.fixture(scope="module", autouse=True)
def figures(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if not FIGURES:
        return
    lines = [
        "",
        "crash safety: seconds from each start of luod to READY / to every file retrieved",
        f"{'step':22} {'call':17} {'in flight':9} {'restart':>15} {'after kexec':>15}",
    ]
    for step, action, outcome, r, k in FIGURES:
        lines.append(
            f"{step:22} {action:17} {outcome:9} {r.ready:7.3f}/{r.retrievable:6.3f}"
            f" {k.ready:7.3f}/{k.retrievable:6.3f}"
        )
    worst = max(max(r.retrievable, k.retrievable) for _s, _a, _o, r, k in FIGURES)
    lines.append(f"{len(FIGURES)} cases; longest until every file was retrievable: {worst:.3f}s")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n".join(lines))


def test_every_step_has_a_case() -> None:
    steps = {spec.partition(":")[0] for spec, _ in CASES}
    # Steps of a recovery only: test_kill_in_recovery kills there.
    steps |= {second for _first, _call, second in RECOVERY_CASES}
    # After the reply went out: test_kill_after_a_take_went_out.
    steps.add("take.delivered")
    assert steps == set(crashpoint.STEPS)


@pytest.mark.parametrize(("step", "call"), CASES, ids=[f"{s}-{a}" for s, a in CASES])
def test_kill_at_step(pid1: FakePid1, step: str, call: str) -> None:
    action = ACTIONS[call]
    world = populate(pid1)
    held: list[int] = []
    if action.run is None and not action.kexec:
        kill_in_restart(pid1, step)
    elif action.run is None:
        kill_after_kexec(pid1, step, *action.args, env={CRASH_ENV: step})
    else:
        if action.kexec:
            pid1.kexec()
        else:
            # A restart first: the call is made by a luod that took everything back.
            pid1.kill9()
        pid1.start(env={CRASH_ENV: step})
        held = kill_in_call(pid1, action, step)

    # (a), (b), (d), right after READY.
    outcome, restart = timed_restart(pid1, world, action)
    for fd in held:  # the client knows the outcome: its own copy goes
        os.close(fd)
    if call in TAKES:
        # Killed before its reply went out: what it took is held again.
        assert outcome == "absent"
    with pid1.client() as c:
        wait_preserved_again(c)
        check_kernel_agrees(pid1, c, world)  # (c)
        # (e): the same sessions take more, one file and a batch.
        for session, files, batch in (
            ("app", {"f1": data_for("app", "f1", 100)}, False),
            ("app", {"f2": data_for("app", "f2", 5), "f3": data_for("app", "f3", 6)}, True),
            ("db", {"y": data_for("db", "y", 70)}, False),
            ("new", {"g": data_for("new", "g", 50)}, False),
        ):
            hand_off(c, session, files, create=True, batch=batch)
            world.managed.setdefault(session, {}).update(files)
        check_listing(c, world)
        retrieve_all(c, world)
        check_kernel_agrees(pid1, c, world)
        if action.kexec:
            # Adopted sessions that came over go back to their client (not
            # claimed, they would be lost at the next kexec).
            retrieve_adopted(pid1, c, world)
            check_kernel_agrees(pid1, c, world)

    # (f): the next kexec carries it all.
    pid1.kexec()
    _, after_kexec = timed_restart(pid1, world)
    with pid1.client() as c:
        reclaim = c.status()["reclaim"]
        assert (reclaim["state"], reclaim["lost"]) == ("reclaimed", [])
        wait_preserved_again(c)
        check_kernel_agrees(pid1, c, world)
        retrieve_adopted(pid1, c, world)
    check_logs(pid1)
    FIGURES.append((step, call, outcome, restart, after_kexec))


@pytest.mark.parametrize("call", ["take", "take-last"])
def test_kill_after_a_take_went_out(pid1: FakePid1, call: str) -> None:
    """Killed after the reply of a take went out, before luod recorded
    that it had: the client has the file, and the luod started next holds
    it again all the same (it cannot know whether the reply went out). A
    copy too many, and nothing lost: the client takes it again."""
    action = ACTIONS[call]
    assert action.done is not None
    world = populate(pid1)
    pid1.kill9()
    pid1.start(env={CRASH_ENV: "take.delivered"})
    session, name = ("app", "a") if call == "take" else ("db", "x")
    with pid1.client() as c:
        c.sock.settimeout(CALL_TIMEOUT)
        fd = c.retrieve_fd(session, name, take=True)
    try:
        expect_killed(pid1, "take.delivered")
        restart_and_retrieve(pid1, world)  # held again: as before the take
        assert contents(fd) == world.managed[session][name]
    finally:
        os.close(fd)
    assert f"event=fds-given-back session={session} names={name} " in pid1.log()
    with pid1.client() as c:
        wait_preserved_again(c)
        check_kernel_agrees(pid1, c, world)
        os.close(c.retrieve_fd(session, name, take=True))
        action.done(world)
        check_listing(c, world)
        check_kernel_agrees(pid1, c, world)
    kexec_loses_nothing(pid1, world)
    check_logs(pid1)


# --- the three failures -------------------------------------------------------


def test_crash_in_preserve_again_loses_no_session(pid1: FakePid1) -> None:
    """Failure 1: killed after the kexec between finishing an incoming
    session and naming its new outgoing session, luod lost that session's
    files (listed with none; 'fd-lost' in the log; lost == [] at the next
    kexec)."""
    world = populate(pid1)
    kill_after_kexec(pid1, "the first FINISH", kill_after="finish_session:1")
    pid1.start()
    with pid1.client() as c:
        check_listing(c, world)
        retrieve_all(c, world)
        wait_preserved_again(c)
        check_kernel_agrees(pid1, c, world)
        retrieve_adopted(pid1, c, world)
    kexec_loses_nothing(pid1, world)
    with pid1.client() as c:
        retrieve_adopted(pid1, c, world)
    check_logs(pid1)


def test_files_retrievable_right_after_restart(pid1: FakePid1) -> None:
    """Failure 2: after a restart in the same boot every RetrieveFd said
    NotReady until the next kexec."""
    world = populate(pid1)
    pid1.kill9()
    pid1.start()
    with pid1.client() as c:
        retrieve_all(c, world)
        fd = c.retrieve_fd("app", "a", take=True)
        assert contents(fd) == world.managed["app"].pop("a")
        os.close(fd)
        files = {"m1": data_for("app", "m1", 10), "m2": data_for("app", "m2", 20)}
        hand_off(c, "app", files)
        world.managed["app"].update(files)
        check_listing(c, world)
        retrieve_all(c, world)
        check_kernel_agrees(pid1, c, world)


@pytest.mark.parametrize("into", ["existing", "created"])
def test_call_in_flight_leaves_kernel_and_manifest_agreeing(pid1: FakePid1, into: str) -> None:
    """Failure 3: killed in a hand-off after the kernel took the file,
    luod's manifest did not name it: the kernel held more than luod listed,
    and the next hand-off into that session was refused ('token is used
    already')."""
    world = populate(pid1)
    pid1.kill9()
    pid1.start(kill_after="preserve_fd:1")
    action = ACTIONS["handoff" if into == "existing" else "handoff-create"]
    kill_in_call(pid1, action, "the first preserve")
    pid1.start()
    with pid1.client() as c:
        resolve(listed_shape(c.list_sessions()), world, action)
        assert disagreements(pid1, c, world.adopted, kernel_only=True) == []
        session = "app" if into == "existing" else "new"
        files = {"after": data_for(session, "after", 33)}
        hand_off(c, session, files, create=True, batch=False)
        world.managed.setdefault(session, {}).update(files)
        check_kernel_agrees(pid1, c, world)
        retrieve_all(c, world)
    kexec_loses_nothing(pid1, world)


# --- a claim, a recovery killed in turn, tokens after a crash ------------------------


def test_claim_by_copy_survives_a_crash(pid1: FakePid1) -> None:
    """After a kexec the owner claims a session by copying a file out of
    it. That claim was kept in memory only: killed before anything else
    was committed, the luod restarted in the same boot read the claim
    deadline back from the manifest and released the claimed session when
    the grace period ended (unclaimed-released), files and all."""
    world = populate(pid1)
    grace = "--grace=3s"
    pid1.kexec()
    pid1.start(grace)
    with pid1.client() as c:
        wait_preserved_again(c)  # everything committed before the claim
        fd = c.retrieve_fd("app", "a")
        os.close(fd)
    pid1.kill9()
    pid1.start(grace)
    with pid1.client() as c:
        # The sessions nobody claimed go at the deadline; the claimed one stays.
        wait_until(lambda: "db" not in listed_shape(c.list_sessions()), "the grace period ended")
        assert listed_shape(c.list_sessions()) == {
            "app": ("managed", frozenset(world.managed["app"]))
        }
        retrieve_all(c, World(managed={"app": world.managed["app"]}))


# (first kill, its call, second kill): luod killed in the recovery from a
# kill in a change that left a session half done, then started again.
RECOVERY_CASES: list[tuple[str, str, str]] = [
    # Only luod's kept references hold the session's files (its old kernel
    # session let go of, or the incoming one finished) while they are taken
    # back.
    ("take.dropped", "take", "reclaim.refs"),
    ("again.finished", "kexec", "reclaim.refs"),
    # Rebuilding the session.
    *[
        (first, call, second)
        for first, call in (
            ("take.dropped", "take"),
            ("take.represerved", "take"),
            ("handoff.preserved", "handoff"),
            ("handoff.kept", "handoff-batch"),
        )
        for second in ("rebuild.dropped", "rebuild.represerved", "rebuild.committed")
    ],
]


@pytest.mark.parametrize(
    ("first", "call", "second"),
    RECOVERY_CASES,
    ids=[f"{f}-{a}-{s}" for f, a, s in RECOVERY_CASES],
)
def test_kill_in_recovery(pid1: FakePid1, first: str, call: str, second: str) -> None:
    """Recovery is idempotent: killed in it, the start after recovers as
    well. Before, a start killed while it took back the references of a
    session only they held (reclaim.refs) had taken them out of their
    parking, and the start after that lost every file of the session
    (fd-lost, lost != [])."""
    action = ACTIONS[call]
    world = populate(pid1)
    if action.run is None:
        kill_after_kexec(pid1, first, env={CRASH_ENV: first})
    else:
        pid1.kill9()
        pid1.start(env={CRASH_ENV: first})
        kill_in_call(pid1, action, first)
    start_killed_at(pid1, second)
    restart_and_retrieve(pid1, world, action)
    with pid1.client() as c:
        assert c.status()["reclaim"]["lost"] == []
        wait_preserved_again(c)
        check_kernel_agrees(pid1, c, world)
        files = {"after": data_for("app", "after", 21)}
        hand_off(c, "app", files, batch=False)
        world.managed["app"].update(files)
        check_kernel_agrees(pid1, c, world)
        if action.kexec:
            retrieve_adopted(pid1, c, world)
    pid1.kexec()
    restart_and_retrieve(pid1, world)
    with pid1.client() as c:
        assert c.status()["reclaim"]["lost"] == []
        wait_preserved_again(c)
        check_kernel_agrees(pid1, c, world)
    check_logs(pid1)


def test_no_token_given_out_twice_after_a_crash(workdir: Path, fake_kernel: str) -> None:
    """The write-ahead intent of a hand-off says the highest token the
    change may give out, for a session a restarted luod cannot rebuild
    (luod kept no reference to some of its files: the fd store was full).
    It said the highest before the hand-off, so the kernel still held the
    file of the hand-off killed in flight under the very token the next
    hand-off was given: refused, 'File exists'."""
    # The manifest, the session and the journal fill the store: luod keeps
    # no reference to the files (their parking does not fit).
    pid1 = FakePid1(workdir, fake_kernel, store_max=4)
    try:
        pid1.start()
        world = World(managed={"app": {"a": data_for("app", "a", 100)}})
        with pid1.client() as c:
            hand_off(c, "app", world.managed["app"], create=True, batch=False)
        pid1.kill9()
        pid1.start(env={CRASH_ENV: "handoff.preserved"})
        kill_in_call(pid1, ACTIONS["handoff"], "handoff.preserved")
        pid1.start()
        assert "event=session-not-rebuilt" in pid1.log()
        with pid1.client() as c:
            resolve(listed_shape(c.list_sessions()), world, ACTIONS["handoff"])
            files = {"e": data_for("app", "e", 10)}
            hand_off(c, "app", files, batch=False)
            world.managed["app"].update(files)
            check_listing(c, world)
        kexec_loses_nothing(pid1, world)
    finally:
        pid1.close()
