"""Guest side of luod's real-kernel scenarios (tests/vm/test_luod.py).

luod runs as its own process on /dev/liveupdate; this program is the client
(and the operator, through luoctl). Each stage writes luod-<scenario>-<N>.json
into the results share; pytest asserts on them. The scenario comes from
LUOD_VM_SCENARIO:

- main: three memfds (1 KiB, 8 MiB, sealed) handed off over varlink; a
  session the client created itself, handed over whole; unsupported fds
  refused; an unclaimed session; `luoctl kexec` (kexec_file_load, then luod
  reboots); after it the reclaim, the retrieves, the grace release; one more
  kexec proves custody goes on. Takes whose replies are not read (a file, a
  session handed back) leave them held, also one whose reply still waits
  when luod kexecs itself.
- scale: 20 sessions x 10 memfds of random sizes up to 4 MiB.
- manifest: luod's state session prepared corrupt, then of an unknown
  version: luod reports it, releases nothing, stays up.
- update: the orchestrated update: a delegated session the client filled
  itself; two subscribers, one missing its deadline (abort, nothing lost),
  then both acknowledging (kexec); after it both are told "resumed".
- takeover: issue 10's session-name takeover, on the real kernel: uid 65534
  creates "cache" first, root hands off into "cache" with createSession,
  uid 65534 tries to take root's file, before and after the kexec; and
  uid 65534's sparse memfds against luod's cap on what all users but root
  pin together.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import random
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from luod.carriers.slots import capacity_for, write_slot
from luod.client import Client, VarlinkError
from luod.interfaces import CUSTODY
from luod.kernel.backend import KernelBackend, LuoError
from testsupport.guest import take_unread
from testsupport.luodproc import LuodProcess
from testsupport.util import make_memfd, memfd_facts, run_as
from testsupport.vm import guestlib

WORK = Path("/run/luod-test")
TMP = Path(tempfile.gettempdir())
GRACE = "15s"
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def facts(fd: int) -> dict[str, Any]:
    """sha256, size, position and seals of a memfd, as JSON for the host."""
    return dataclasses.asdict(memfd_facts(fd))


def memfd(data: bytes, position: int = 0, seals: int = 0) -> int:
    return make_memfd(data, position, seals, name="guest")


def start_luod(*args: str) -> LuodProcess:
    WORK.mkdir(parents=True, exist_ok=True)
    p = LuodProcess(WORK, [], [f"--grace={GRACE}", *args], ready_timeout=180.0)
    t0 = time.monotonic()
    p.start()
    guestlib.write_json(
        f"luod-start-{guestlib.stage()}.json",
        {"seconds": time.monotonic() - t0, "uptime": guestlib.uptime()},
    )
    return p


def luoctl_kexec(luod: LuodProcess, out: dict[str, Any], name: str) -> None:
    """The operator's live update: luoctl loads the kernel with
    kexec_file_load and asks luod (no systemd here) to reboot into it."""
    out["uptime_kexec"] = guestlib.uptime()
    guestlib.write_json(name, out)
    r = guestlib.run_luoctl_kexec(guestlib.luoctl_kexec_argv(luod.socket))
    # Not reached when the kexec came: luod jumps right after its reply.
    out["luoctl_kexec"] = {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr}
    guestlib.write_json(name, out)
    raise RuntimeError(f"still here after luoctl kexec: {r.stderr}")


def _names(c: Client, session: str) -> list[str]:
    return sorted(f["name"] for f in c.list_sessions(session)[0]["files"])


def _refusals(c: Client) -> dict[str, Any]:
    """Unsupported fds get named errors and change nothing."""
    before = c.list_sessions()
    got: dict[str, Any] = {}
    r, w = os.pipe()
    a, b = socket.socketpair()
    # The guest's writable temp dir: /tmp is the host's, read-only, when the
    # repo itself lives under /tmp (a CI clone); init sets TMPDIR then.
    reg = os.open(TMP / "regular-file", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.write(reg, b"on tmpfs, but a named file")
    ev = os.eventfd(0, os.EFD_CLOEXEC)
    for label, fd in (("pipe", r), ("socket", a.fileno()), ("regular", reg), ("eventfd", ev)):
        try:
            c.preserve_fd("app", label, fd)
            got[label] = "accepted"
        except VarlinkError as e:
            got[label] = {"error": e.error, **e.parameters}
    for fd in (r, w, reg, ev):
        os.close(fd)
    a.close()
    b.close()
    got["unchanged"] = c.list_sessions() == before
    return got


def main_stage1(out: dict[str, Any]) -> None:
    be = KernelBackend()
    # The client's own session, made while luod does not hold the device.
    own = be.create_session("client-own")
    own_data = random.Random(7).randbytes(200_000)
    own_fd = memfd(own_data, position=99)
    be.preserve_fd(own, own_fd, 42)
    out["own"] = facts(own_fd)

    luod = start_luod()
    payloads = {
        "small": (random.Random(1).randbytes(1024), 100, 0),
        "big": (random.Random(2).randbytes(8 << 20), 4 << 20, 0),
        "sealed": (random.Random(3).randbytes(65536), 0, SEALS),
    }
    out["app"] = {}
    with luod.client() as c:
        for name, (data, pos, seals) in payloads.items():
            fd = memfd(data, pos, seals)
            t0 = time.monotonic()
            c.preserve_fd("app", name, fd, create_session=True)
            out["app"][name] = {**facts(fd), "handoff_seconds": time.monotonic() - t0}
            os.close(fd)
        adopted = c.adopt_session(own)
        out["adopted"] = {"name": adopted["name"], "kind": adopted["kind"]}
        os.close(own)
        os.close(own_fd)
        keep = memfd(random.Random(4).randbytes(300_000), position=1234)
        out["keep"] = facts(keep)
        c.preserve_fd("keep", "blob", keep, create_session=True)
        os.close(keep)
        c.preserve_fd("orphan", "x", memfd(b"nobody comes back for me"), create_session=True)
        out["refusals"] = _refusals(c)
        out["check"] = c.check()
        out["sessions"] = c.list_sessions()
    luoctl_kexec(luod, out, "luod-main-1.json")


def main_stage2(out: dict[str, Any]) -> None:
    be = KernelBackend()
    luod = start_luod()
    with luod.client() as c:
        out["status"] = c.status()
        out["sessions"] = c.list_sessions()
        # Taken, and the reply not read (the client shut its socket for
        # reading): held again, preserved into the session anew.
        luod.call_unheard(
            f"{CUSTODY}.RetrieveFd",
            {"session": "app", "name": "big", "take": True},
            "fds-given-back",
        )
        out["app_after_unheard"] = _names(c, "app")
        out["app"] = {}
        for name in ("small", "big", "sealed"):
            t0 = time.monotonic()
            fd = c.retrieve_fd("app", name, take=True)
            out["app"][name] = {**facts(fd), "retrieve_seconds": time.monotonic() - t0}
            os.close(fd)
        out["app_gone"] = all(s["name"] != "app" for s in c.list_sessions())
        luod.call_unheard(
            f"{CUSTODY}.RetrieveSession", {"session": "client-own"}, "session-given-back"
        )
        sfd = c.retrieve_session("client-own")
        # Given back, the session is incoming: the kernel would not carry
        # it again, so luod does not adopt it (its probe changes nothing:
        # the file is retrieved out of it below).
        try:
            c.adopt_session(sfd)
            out["readopt"] = "accepted"
        except VarlinkError as e:
            out["readopt"] = {"error": e.error, **e.parameters}
        fd = be.retrieve_fd(sfd, 42)
        out["own"] = facts(fd)
        be.finish_session(sfd)
        os.close(fd)
        os.close(sfd)
        os.close(c.retrieve_fd("keep", "blob"))  # a copy: claims it, custody goes on
        # Its only file taken, the reply not read: the session is let go of
        # and made again with it, to be carried over the next kexec.
        luod.call_unheard(
            f"{CUSTODY}.RetrieveFd",
            {"session": "keep", "name": "blob", "take": True},
            "fds-given-back",
        )
    # The grace timer started at the reclaim, before the claims above: wait
    # for luod to have nothing left to release (bounded, for a loaded host)
    # rather than sleep for the grace period and hope its timer has run.
    deadline = time.monotonic() + 120
    while True:
        with luod.client() as c:
            pending = c.status()["nextReleaseUSec"] is not None
            out["after_grace"] = [s["name"] for s in c.list_sessions()]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # Taken again, the reply waiting for a client that reads nothing when
    # luod kexecs itself: cut before the jump, the file is held again and
    # carried (stage 3 takes it).
    waiting = take_unread(luod.socket, "keep", "blob")
    with luod.client() as c:
        deadline = time.monotonic() + 60
        while any(s["name"] == "keep" for s in c.list_sessions()):
            assert time.monotonic() < deadline, "keep/blob never taken"
            time.sleep(0.2)
    out["log"] = luod.log()
    luoctl_kexec(luod, out, "luod-main-2.json")
    waiting.close()  # not reached: the kexec came


def main_stage3(out: dict[str, Any]) -> None:
    luod = start_luod()
    with luod.client() as c:
        out["status"] = c.status()
        out["sessions"] = c.list_sessions()
        fd = c.retrieve_fd("keep", "blob", take=True)
        out["keep"] = facts(fd)
        os.close(fd)
    out["log"] = luod.log()
    luod.stop()


# Scenarios that do not test the grace period must not race it.
LONG_GRACE = "--grace=1h"


def scale_stage1(out: dict[str, Any]) -> None:
    rng = random.Random(20)
    luod = start_luod(LONG_GRACE)
    expected: dict[str, dict[str, Any]] = {}
    t0 = time.monotonic()
    handoff = 0.0
    with luod.client() as c:
        for s in range(20):
            files = []
            for f in range(10):
                fd = memfd(rng.randbytes(rng.randint(1, 4 << 20)), position=rng.randint(0, 4096))
                expected[f"s{s}/f{f}"] = facts(fd)
                files.append((f"f{f}", fd))
            h0 = time.monotonic()
            c.preserve_fds(f"s{s}", files, create_session=True)
            handoff += time.monotonic() - h0
            for _n, fd in files:
                os.close(fd)
        out["status"] = c.status()
    out["expected"] = expected
    out["handoff_seconds"] = handoff
    out["fill_seconds"] = time.monotonic() - t0
    luoctl_kexec(luod, out, "luod-scale-1.json")


def scale_stage2(out: dict[str, Any]) -> None:
    luod = start_luod(LONG_GRACE)
    got: dict[str, dict[str, Any]] = {}
    with luod.client() as c:
        out["status"] = c.status()
        for s in range(20):
            for f in range(10):
                fd = c.retrieve_fd(f"s{s}", f"f{f}", take=True)
                got[f"s{s}/f{f}"] = facts(fd)
                os.close(fd)
        out["left"] = c.list_sessions()
    out["got"] = got
    luod.stop()


def _state_session(be: KernelBackend, payload: bytes | None) -> tuple[int, int]:
    """A session named like luod's own, with a manifest memfd that is
    garbage (payload None) or `payload` in a valid slot."""
    s = be.create_session("luod")
    m = os.memfd_create("manifest", os.MFD_CLOEXEC)
    size = capacity_for(100)
    os.ftruncate(m, size)
    if payload is None:
        os.pwrite(m, b"this is not a manifest", 0)
    else:
        write_slot(m, size, 0, 1, payload)
    be.preserve_fd(s, m, 1)
    return s, m


def manifest_stage1(out: dict[str, Any]) -> None:
    be = KernelBackend()
    keep = [*_state_session(be, None)]
    other = be.create_session("luod.9.app")
    data = memfd(b"precious, not to be released")
    be.preserve_fd(other, data, 1)
    keep += [other, data]
    guestlib.write_json("luod-manifest-1.json", out)
    guestlib.kexec_next_stage()


def _report(luod: LuodProcess, out: dict[str, Any]) -> None:
    with luod.client() as c:
        out["status"] = c.status()
        out["check"] = c.check()
        try:
            c.create_session("new")
            out["create"] = "accepted"
        except VarlinkError as e:
            out["create"] = e.error
    out["alive"] = luod.proc is not None and luod.proc.poll() is None
    out["log"] = luod.log()


def manifest_stage2(out: dict[str, Any]) -> None:
    be = KernelBackend()
    luod = start_luod()
    _report(luod, out)
    # Nothing released: the session named in no manifest is still there,
    # unretrieved, for a luod that can read the state to take over.
    luod.stop()
    try:
        s = be.retrieve_session("luod.9.app")
        fd = be.retrieve_fd(s, 1)
        out["other_intact"] = os.pread(fd, 100, 0) == b"precious, not to be released"
        be.finish_session(s)
    except LuoError as e:
        out["other_intact"] = f"{e}"
    # Next: a manifest of a version this luod does not know.
    _keep = _state_session(be, b'{"version": 99, "sessions": []}')
    guestlib.write_json("luod-manifest-2.json", out)
    guestlib.kexec_next_stage()


def manifest_stage3(out: dict[str, Any]) -> None:
    luod = start_luod()
    _report(luod, out)
    luod.stop()


def _luoctl(luod: LuodProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*guestlib.luoctl(luod.socket), *args], capture_output=True, text=True, timeout=120
    )


def _subscriber(luod: LuodProcess, name: str, *args: str) -> tuple[subprocess.Popen[str], Path]:
    out = TMP / f"sub-{name}-{guestlib.stage()}.jsonl"
    f = open(out, "w")  # noqa: SIM115 - handed to the child
    p = subprocess.Popen(
        [*guestlib.luoctl(luod.socket), "--json", "subscribe", name, *args],
        stdout=f,
        stderr=subprocess.STDOUT,
        text=True,
    )
    f.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not out.read_text().strip():
        time.sleep(0.1)
    return p, out


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def update_stage1(out: dict[str, Any]) -> None:
    be = KernelBackend()
    luod = start_luod(LONG_GRACE)
    vmm_data = {5: random.Random(5).randbytes(1 << 20), 6: random.Random(6).randbytes(4096)}
    with luod.client() as c:
        sfd = c.create_delegated_session("vmm")
        for token, data in vmm_data.items():
            be.preserve_fd(sfd, memfd(data), token)
        os.close(sfd)  # the client is gone; luod holds the session
        c.preserve_fd("db-state", "wal", memfd(b"wal " * 1000), create_session=True)
    out["vmm"] = {str(t): hashlib.sha256(d).hexdigest() for t, d in vmm_data.items()}
    _db, db_out = _subscriber(luod, "db", "--ack")
    slow, _ = _subscriber(luod, "slow", "--deadline", "1")
    r = _luoctl(
        luod, "load", os.environ["LUOD_VM_KERNEL"], "--append", guestlib.next_stage_cmdline()
    )
    out["load"] = {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr}
    with luod.client() as c:
        before = c.list_sessions()
    r = _luoctl(luod, "update")
    out["aborted_update"] = {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr}
    with luod.client() as c:
        out["unchanged_after_abort"] = c.list_sessions() == before
        out["status_after_abort"] = c.status()
    out["db_events_after_abort"] = _events(db_out)
    slow.terminate()
    slow.wait()
    _slow2, _ = _subscriber(luod, "slow", "--ack")
    out["uptime_update"] = guestlib.uptime()
    guestlib.write_json("luod-update-1.json", out)
    r = _luoctl(luod, "update")
    out["update"] = {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr}
    guestlib.write_json("luod-update-1.json", out)
    time.sleep(120)
    raise RuntimeError(f"still here after luoctl update: {r.stderr}")


def update_stage2(out: dict[str, Any]) -> None:
    be = KernelBackend()
    luod = start_luod(LONG_GRACE)
    for name in ("db", "slow"):
        p, path = _subscriber(luod, name)
        out[f"{name}_first"] = _events(path)[0]
        p.terminate()
        p.wait()
    with luod.client() as c:
        out["status"] = c.status()
        sfd = c.retrieve_session("vmm")
    out["vmm"] = {}
    for token in (5, 6):
        fd = be.retrieve_fd(sfd, token)
        out["vmm"][str(token)] = facts(fd)["sha256"]
        os.close(fd)
    be.finish_session(sfd)
    os.close(sfd)
    out["log"] = luod.log()
    luod.stop()


NOBODY = 65534


def as_nobody(luod: LuodProcess, *steps: Any) -> list[Any]:
    """Run `steps` (each: Client -> JSON-able) in a child of uid 65534 on
    one connection; their results, an error as {"error": short name}."""

    def work() -> list[Any]:
        out: list[Any] = []
        with Client(luod.socket) as c:
            for step in steps:
                try:
                    out.append(step(c))
                except VarlinkError as e:
                    out.append({"error": e.short})
        return out

    return run_as(NOBODY, work)


def _digest(fd: int) -> str:
    try:
        return str(facts(fd)["sha256"])
    finally:
        os.close(fd)


def _nobody_tries(c: Client) -> dict[str, Any]:
    """Everything uid 65534 can try on root's "cache"/"index"."""
    got: dict[str, Any] = {}
    for label, call in (
        ("take", lambda: _digest(c.retrieve_fd("cache", "index", take=True))),
        ("copy", lambda: _digest(c.retrieve_fd("cache", "index"))),
        ("take_owner_root", lambda: _digest(c.retrieve_fd("cache", "index", True, owner=0))),
        ("discard_owner_root", lambda: c.discard_session("cache", owner=0)),
        ("list_owner_root", lambda: c.list_sessions(owner=0)),
    ):
        try:
            got[label] = call()
        except VarlinkError as e:
            got[label] = e.short
    got["sees"] = [
        {"name": s["name"], "uid": s["owner"]["uid"], "files": [f["name"] for f in s["files"]]}
        for s in c.list_sessions()
    ]
    return got


def _owners(c: Client) -> list[dict[str, Any]]:
    return sorted(
        (
            {
                "name": s["name"],
                "uid": s["owner"]["uid"],
                "kernelName": s["kernelName"],
                "files": sorted(f["name"] for f in s["files"]),
            }
            for s in c.list_sessions()
        ),
        key=lambda s: s["uid"],
    )


def _sparse(size: int) -> int:
    """A memfd of `size` bytes with no page in it."""
    fd = os.memfd_create("sparse", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _shmem_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Shmem:"):
            return int(line.split()[1])
    raise RuntimeError("no Shmem in /proc/meminfo")


def _sparse_handoffs(luod: LuodProcess) -> dict[str, Any]:
    """uid 65534 hands off a sparse memfd of 32 MiB, then one of 16 MiB:
    the kernel fills the first with pages at its preserve (luod's, once
    nobody has let go of its fd); the second would take all users but root
    over luod's --max-bytes-all-users (40M) and is refused before the
    kernel sees it."""
    before = _shmem_kib()
    pinned, refused = as_nobody(
        luod,
        lambda c: c.preserve_fd("sparse", "a", _sparse(32 << 20), create_session=True)["size"],
        lambda c: c.preserve_fd("sparse", "b", _sparse(16 << 20)),
    )
    held = _shmem_kib()
    as_nobody(luod, lambda c: c.discard_session("sparse"))
    return {
        "pinned": pinned,
        "refused": refused,
        "grew_kib": held - before,
        "freed_kib": held - _shmem_kib(),
    }


def takeover_stage1(out: dict[str, Any]) -> None:
    luod = start_luod(LONG_GRACE, "--max-bytes-all-users=40M")
    out["sparse"] = _sparse_handoffs(luod)
    (created,) = as_nobody(luod, lambda c: c.create_session("cache")["owner"]["uid"])
    out["nobody_created"] = created
    index = memfd(random.Random(10).randbytes(1 << 20), position=77)
    out["index"] = facts(index)
    with luod.client() as c:
        info = c.preserve_fd("cache", "index", index, create_session=True)
        out["root_handoff"] = {"name": info["name"], "size": info["size"]}
    os.close(index)
    tried, mine = as_nobody(
        luod,
        _nobody_tries,
        lambda c: c.preserve_fd("cache", "mine", memfd(b"nobody's own bytes"))["size"],
    )
    out["nobody_tried"] = tried
    out["nobody_handoff"] = mine
    with luod.client() as c:
        out["sessions"] = _owners(c)
        out["status"] = c.status()
    luoctl_kexec(luod, out, "luod-takeover-1.json")


def takeover_stage2(out: dict[str, Any]) -> None:
    luod = start_luod(LONG_GRACE)
    with luod.client() as c:
        out["sessions"] = _owners(c)
        out["status"] = c.status()
    tried, mine, status = as_nobody(
        luod,
        _nobody_tries,
        lambda c: os.pread(c.retrieve_fd("cache", "mine", take=True), 100, 0).decode(),
        lambda c: {k: c.status()["reclaim"][k] for k in ("sessions", "files", "lost")},
    )
    out["nobody_tried"] = tried
    out["nobody_mine"] = mine
    out["nobody_status"] = status
    with luod.client() as c:
        fd = c.retrieve_fd("cache", "index", take=True)
        out["index"] = facts(fd)
        os.close(fd)
        out["left"] = _owners(c)
    out["log"] = luod.log()
    luod.stop()


STAGES = {
    "main": {1: main_stage1, 2: main_stage2, 3: main_stage3},
    "scale": {1: scale_stage1, 2: scale_stage2},
    "manifest": {1: manifest_stage1, 2: manifest_stage2, 3: manifest_stage3},
    "update": {1: update_stage1, 2: update_stage2},
    "takeover": {1: takeover_stage1, 2: takeover_stage2},
}


def main() -> int:
    return guestlib.run_stage(STAGES, "luod", WORK, timed=True)


if __name__ == "__main__":
    raise SystemExit(main())
