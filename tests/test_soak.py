"""A kill -9 soak (issue 11): a seeded stream of mixed calls from several
clients against luod under the fake PID 1 (fd-store carrier, fake kernel),
with luod killed (SIGKILL) at random moments and restarted, over two fake
kexecs; then a last kexec, after which everything acknowledged must come
back byte-identical.

Each client (a thread) keeps its own sessions and a model of what luod
acknowledged to it. A call whose connection died with luod is resolved
after the restart from ListSessions: it must be fully done or fully absent.
Copies are checked against the model as they go, and right after each
restart every listed file must be retrievable (how long that took from the
start of luod is recorded). At the end: the listing equals the models, the
kernel and the fd store hold nothing luod does not list (orphans), and the
next kexec carries every file byte-identical.

The figures (calls acknowledged, kills, files lost, orphans, time from a
restart until every file was retrievable) are printed at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import statistics
import threading
import time
import traceback
from collections.abc import Callable, Iterator

import pytest

from luod.client import Client, VarlinkError
from tests.test_crashsafety import (
    ADOPTED_TOKEN,
    World,
    check_listing,
    contents,
    disagreements,
    hand_off,
    listed_shape,
    own_session,
    retrieve_all,
    wait_preserved_again,
)
from testsupport.fakekernel import FakeBackend
from testsupport.fakepid1 import FakePid1

SEED = 20260611
CLIENTS = 4
KILLS = 52  # random kills, besides those right after a start or a kexec
KEXECS_AT = (KILLS // 3, 2 * KILLS // 3)  # after these kills: a kexec mid-way
MAX_SESSIONS = 4  # managed sessions per client
MAX_FILES = 8  # per session
CALL_TIMEOUT = 30.0

# Calls and how often each is picked.
WEIGHTS = {
    "handoff": 4,
    "batch": 2,
    "create-handoff": 2,
    "create": 1,
    "take": 2,
    "copy": 4,
    "discard": 1,
    "adopt": 1,
}


@dataclasses.dataclass
class Tally:
    acknowledged: int = 0  # calls answered (a refusal is not counted)
    in_flight_done: int = 0  # calls cut off by a kill, found done after it
    in_flight_absent: int = 0  # ... found not done
    # Takes answered whose file luod held again after a kill: killed after
    # the reply went out, before it recorded that it had (at least once).
    held_again: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def error(self, what: str) -> None:
        with self.lock:
            self.errors.append(what)


class Pause:
    """Lets the coordinator stop every client between two calls."""

    def __init__(self, clients: int) -> None:
        self.cond = threading.Condition()
        self.paused = False
        self.stopped = False
        self.idle = 0
        self.clients = clients

    def proceed(self) -> bool:
        """At the top of a client's loop: False once the soak is over."""
        with self.cond:
            if self.paused:
                self.idle += 1
                self.cond.notify_all()
                self.cond.wait_for(lambda: not self.paused)
                self.idle -= 1
            return not self.stopped

    @contextlib.contextmanager
    def clients_idle(self, alive: Callable[[], int]) -> Iterator[None]:
        with self.cond:
            self.paused = True
            ok = self.cond.wait_for(lambda: self.idle >= alive(), 60)
            assert ok, "the clients did not pause"
        try:
            yield
        finally:
            with self.cond:
                self.paused = False
                self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.paused = False
            self.cond.notify_all()


class Worker(threading.Thread):
    """One client: a seeded stream of calls into its own sessions."""

    def __init__(self, i: int, pid1: FakePid1, tally: Tally, pause: Pause) -> None:
        super().__init__(name=f"client-{i}", daemon=True)
        self.i = i
        self.prefix = f"c{i}-"
        self.socket = pid1.luod.socket
        self.kernel = FakeBackend(pid1.fake_kernel)
        self.rng = random.Random(f"{SEED}/{i}")
        self.tally = tally
        self.pause = pause
        self.world = World()  # what luod acknowledged to this client
        # (session, name) -> bytes of the files this client took.
        self.took: dict[tuple[str, str], bytes] = {}
        self.counter = 0
        self.client: Client | None = None
        self.failed = False

    # --- the connection ---------------------------------------------------------

    def conn(self) -> Client:
        if self.client is None:
            self.client = Client(self.socket)
            self.client.sock.settimeout(CALL_TIMEOUT)
        return self.client

    def reconnect(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    # --- the calls ----------------------------------------------------------------

    def fresh(self, what: str) -> str:
        self.counter += 1
        return f"{what}{self.counter}"

    def data(self) -> bytes:
        return self.rng.randbytes(self.rng.choice((1, 100, 4096, 20_000)))

    def pick(self) -> tuple[str, Callable[[Client, list[int]], None], Callable[[World], object]]:
        """A call that fits what this client holds: (what, make it, what it
        changes when done)."""
        w = self.world
        roomy = [s for s, f in w.managed.items() if len(f) < MAX_FILES - 3]
        files = [(s, n) for s, f in w.managed.items() for n in f]
        possible = {
            "handoff": bool(roomy),
            "batch": bool(roomy),
            "create-handoff": len(w.managed) < MAX_SESSIONS,
            "create": len(w.managed) < MAX_SESSIONS,
            "take": bool(files),
            "copy": bool(files),
            "discard": bool(w.managed or w.adopted),
            "adopt": len(w.adopted) < 2,
        }
        ops = [op for op in WEIGHTS if possible[op]]
        op = self.rng.choices(ops, [WEIGHTS[o] for o in ops])[0]

        def nothing(_w: World) -> None:
            pass

        if op in ("handoff", "batch", "create-handoff"):
            if op == "create-handoff":
                session, create = self.prefix + self.fresh("s"), True
            else:
                session, create = self.rng.choice(roomy), False
            count = 1 if op == "handoff" else self.rng.randint(1, 3)
            new = {self.fresh("f"): self.data() for _ in range(count)}
            batch = op != "handoff"

            def handoff(c: Client, _held: list[int]) -> None:
                hand_off(c, session, new, create=create, batch=batch)

            return op, handoff, lambda w: w.managed.setdefault(session, {}).update(new)
        if op == "create":
            session = self.prefix + self.fresh("s")

            def create_session(c: Client, _held: list[int]) -> None:
                c.create_session(session)

            return op, create_session, lambda w: w.managed.setdefault(session, {})
        if op in ("take", "copy"):
            session, name = self.rng.choice(files)
            want = w.managed[session][name]
            take = op == "take"

            def retrieve(c: Client, _held: list[int]) -> None:
                fd = c.retrieve_fd(session, name, take=take)
                try:
                    got = contents(fd)
                finally:
                    os.close(fd)
                if got != want:
                    self.tally.error(
                        f"{self.name}: {op} {session}/{name}: not the bytes handed off"
                    )
                if take:
                    self.took[(session, name)] = want

            def taken(w: World) -> None:
                del w.managed[session][name]
                if not w.managed[session]:
                    del w.managed[session]  # taking the last file releases the session

            if take:
                return op, retrieve, taken
            return op, retrieve, nothing
        if op == "discard":
            session = self.rng.choice(sorted([*w.managed, *w.adopted]))

            def discard(c: Client, _held: list[int]) -> None:
                c.discard_session(session)

            def discarded(w: World) -> None:
                w.managed.pop(session, None)
                w.adopted.pop(session, None)

            return op, discard, discarded
        session, data = self.prefix + self.fresh("own"), self.data()

        def adopt(c: Client, held: list[int]) -> None:
            sfd = own_session(self.kernel, session, data)
            held.append(sfd)
            c.adopt_session(sfd)

        return op, adopt, lambda w: w.adopted.update({session: data})

    def step(self) -> None:
        op, make, done = self.pick()
        held: list[int] = []
        try:
            make(self.conn(), held)
        except VarlinkError as e:
            self.tally.error(f"{self.name}: {op} refused: {e}")
            self.resolve(op, done, refused=True)
        except OSError:  # the connection died with luod (or timed out)
            self.reconnect()
            self.resolve(op, done)
        else:
            done(self.world)
            with self.tally.lock:
                self.tally.acknowledged += 1
        finally:
            for fd in held:  # the outcome is known: the client's own copy goes
                os.close(fd)

    def resolve(self, op: str, done: Callable[[World], object], refused: bool = False) -> None:
        """The call's outcome, from what luod lists now: fully done or
        fully absent (a refused call: absent)."""
        while True:
            try:
                listed = self.conn().list_sessions()
                break
            except OSError:
                self.reconnect()
                time.sleep(0.01)
        shape = {s: v for s, v in listed_shape(listed).items() if s.startswith(self.prefix)}
        self.held_again(shape)
        after = self.world.copy()
        done(after)
        if shape == self.world.shape():
            if not refused:
                with self.tally.lock:
                    self.tally.in_flight_absent += 1
            return
        if shape == after.shape() and not refused:
            self.world = after
            with self.tally.lock:
                self.tally.in_flight_done += 1
            return
        self.tally.error(
            f"{self.name}: {op} {'refused' if refused else 'cut off'}, neither done nor absent:"
            f"\n  listed {sorted(shape.items())}\n  before {sorted(self.world.shape().items())}"
            f"\n  after  {sorted(after.shape().items())}"
        )
        raise RuntimeError("the model is lost")

    def held_again(self, shape: dict[str, tuple[str, frozenset[str]]]) -> None:
        """Files this client took (the reply came) that luod lists again:
        luod was killed after the reply went out and before it recorded
        that it had, and the luod after it holds them again. They are this
        client's again, as luod says (fds-given-back, checked at the end)."""
        for (session, name), data in list(self.took.items()):
            if name in shape.get(session, ("", frozenset()))[1]:
                if name not in self.world.managed.get(session, {}):
                    self.world.managed.setdefault(session, {})[name] = data
                    with self.tally.lock:
                        self.tally.held_again.append(f"{session}/{name}")
                del self.took[(session, name)]

    def run(self) -> None:
        try:
            while self.pause.proceed():
                self.step()
        except BaseException:
            self.failed = True
            self.tally.error(f"{self.name} stopped:\n{traceback.format_exc()}")
        finally:
            self.reconnect()


# --- the coordinator ------------------------------------------------------------------


def time_until_retrievable(pid1: FakePid1, tally: Tally) -> float:
    """Right after a start: copy every file luod lists (while the clients
    go on); seconds from the start of luod until all were copied."""
    with pid1.client() as c:
        c.sock.settimeout(CALL_TIMEOUT)
        for s in c.list_sessions():
            for f in s["files"]:
                try:
                    os.close(c.retrieve_fd(s["name"], f["name"]))
                except VarlinkError as e:
                    if e.short not in ("NoSuchSession", "NoSuchFd"):  # taken meanwhile
                        tally.error(f"right after a restart: {s['name']}/{f['name']}: {e}")
    return time.monotonic() - pid1.spawned_at


def merged(workers: list[Worker]) -> World:
    world = World()
    for w in workers:
        world.managed.update(w.world.managed)
        world.adopted.update(w.world.adopted)
    return world


def hand_back_adopted(pid1: FakePid1, c: Client, workers: list[Worker]) -> None:
    """After a kexec the clients claim their adopted sessions (unclaimed,
    the next kexec would lose them): custody ends, the file is checked."""
    for w in workers:
        for session, data in list(w.world.adopted.items()):
            sfd = c.retrieve_session(session)
            try:
                mfd = pid1.kernel.retrieve_fd(sfd, ADOPTED_TOKEN)
                assert contents(mfd) == data, f"{session}: the adopted session's file changed"
                os.close(mfd)
            finally:
                os.close(sfd)
            del w.world.adopted[session]


def lost_files(c: Client, world: World) -> list[str]:
    """Acknowledged files luod does not hand back byte-identical."""
    lost = []
    for session, files in world.managed.items():
        for name, data in files.items():
            try:
                fd = c.retrieve_fd(session, name)
            except VarlinkError as e:
                lost.append(f"{session}/{name}: {e}")
                continue
            try:
                if contents(fd) != data:
                    lost.append(f"{session}/{name}: other bytes")
            finally:
                os.close(fd)
    return lost


def test_kill9_soak(pid1: FakePid1, request: pytest.FixtureRequest) -> None:
    rng = random.Random(SEED)
    tally = Tally()
    pause = Pause(CLIENTS)
    ready: list[float] = []  # seconds from each start of luod to READY=1
    retrievable: list[float] = []  # ... until every file was retrievable
    kills = 0
    t0 = time.monotonic()

    def kill() -> None:
        nonlocal kills
        proc = pid1.luod.proc
        assert proc is not None
        assert proc.poll() is None, f"luod died by itself ({proc.returncode}):\n{pid1.log()}"
        pid1.kill9()
        kills += 1

    def restart() -> None:
        pid1.start()
        ready.append(pid1.ready_at - pid1.spawned_at)
        retrievable.append(time_until_retrievable(pid1, tally))

    pid1.start()
    workers = [Worker(i, pid1, tally, pause) for i in range(CLIENTS)]
    for w in workers:
        w.start()

    def alive() -> int:
        return sum(1 for w in workers if w.is_alive())

    try:
        for k in range(KILLS):
            time.sleep(rng.uniform(0.02, 0.35))
            kill()
            if rng.random() < 0.15:
                # Killed again while it starts (taking back, reconciling).
                pid1.spawn()
                time.sleep(rng.uniform(0.0, 0.12))
                pid1.kill9()
                kills += 1
            restart()
            if k + 1 in KEXECS_AT:
                with pause.clients_idle(alive):
                    pid1.kexec()
                    # Killed at once: while it preserves everything again.
                    pid1.start()
                    time.sleep(rng.uniform(0.0, 0.02))
                    kill()
                    restart()
                    with pid1.client() as c:
                        hand_back_adopted(pid1, c, workers)
                        wait_preserved_again(c)
                        assert disagreements(pid1, c, ()) == []
    except BaseException:
        pause.stop()
        raise
    with pause.clients_idle(alive):
        soak_seconds = time.monotonic() - t0
        # The end: what luod lists is what it acknowledged.
        try:
            with pid1.client() as c:
                shape = listed_shape(c.list_sessions())
                for w in workers:
                    w.held_again({s: v for s, v in shape.items() if s.startswith(w.prefix)})
                world = merged(workers)
                check_listing(c, world)
                retrieve_all(c, world)
                orphans_before = disagreements(pid1, c, world.adopted)
        finally:
            pause.stop()
    for w in workers:
        w.join(CALL_TIMEOUT)

    # The next kexec carries it all.
    pid1.kexec()
    pid1.start()
    with pid1.client() as c:
        reclaim = c.status()["reclaim"]
        lost = lost_files(c, world)
        wait_preserved_again(c)
        orphans = orphans_before + disagreements(pid1, c, world.adopted)
        check_listing(c, world)
        hand_back_adopted(pid1, c, workers)
        orphans += disagreements(pid1, c, ())

    figures = [
        "",
        f"kill -9 soak (seed {SEED}, {CLIENTS} clients, {soak_seconds:.1f}s, 3 kexecs):",
        f"  calls acknowledged   {tally.acknowledged}",
        f"  kills                {kills}",
        f"  cut off by a kill    {tally.in_flight_done} found done, "
        f"{tally.in_flight_absent} found absent",
        f"  takes held again     {len(tally.held_again)} (answered, luod killed before "
        "it recorded that)",
        f"  files at the end     {world.files()} in {len(world.managed)} sessions "
        f"(+{len(world.adopted)} adopted)",
        f"  files lost           {len(lost)}",
        f"  orphans              {len(orphans)}",
        f"  start of luod -> READY:                  max {max(ready):.3f}s, "
        f"median {statistics.median(ready):.3f}s",
        f"  start of luod -> every file retrievable: max {max(retrievable):.3f}s, "
        f"median {statistics.median(retrievable):.3f}s ({len(retrievable)} restarts)",
    ]
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n".join(figures))
    assert tally.errors == []
    assert not [w.name for w in workers if w.failed]
    logs = pid1.all_logs()
    for held in tally.held_again:
        session, name = held.split("/")
        assert f"event=fds-given-back session={session} names={name} " in logs, held
    assert kills >= 50
    assert lost == []
    assert orphans == []
    assert (reclaim["state"], reclaim["lost"]) == ("reclaimed", [])
    logs = pid1.all_logs()
    for event in ("fd-lost", "session-lost", "represerve-failed", "finish-failed"):
        assert f"event={event}" not in logs, f"luod logged {event}"
