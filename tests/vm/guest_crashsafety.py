"""Guest side of issue 11's real-kernel proofs without systemd
(tests/vm/test_crashsafety.py): luod killed with SIGKILL at the reclaim
and re-preserve steps on /dev/liveupdate, and what a crash costs under the
state-session carrier.

There is no systemd in the bare VM, so the fd store comes from
testsupport.fakepid1's FakePid1, here on the real kernel (`GuestPid1`):
its notify socket keeps luod's store, it starts luod with the store in
LISTEN_FDS, and over a kexec it does what PID 1 (systemd >= 261) does:
memfds of the store into a LUO session 'systemd' of its own, session fds
kept open (by name) until the reboot syscall; in the next boot both are
retrieved and put back into the store under the same names. luod runs as
the test entry point testsupport.luod_crashable, so that
LUOD_TEST_CRASH_AT=STEP[:N] kills it (SIGKILL, by itself) at a named step
of luod.crashpoint.

Stages (scenario "crash"), each writing luod-crash-N.json into the
results share:

1. a) state-session carrier: luod as a plain process holds two files;
      `luoctl status`/GetStatus and Check say what a crash would cost;
      kill -9; the kernel has let go of the session (its name is free).
   b) fd-store carrier: SESSIONS x SIZES memfds of known bytes handed to luod under
      GuestPid1, then PID 1's kexec.
2. luod killed at reclaim.retrieved, then (each new luod) at
   again.finished and again.represerved; then started without the hook:
   how soon READY came, every file retrieved at once (copies) byte for
   byte, the reclaim report; PID 1's kexec once luod has preserved
   everything again.
3. every file retrieved byte for byte again, the reclaim report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from luod.client import Client, VarlinkError
from luod.kernel.backend import KernelBackend, LuoError
from testsupport import fakepid1
from testsupport.crashhook import ENV as CRASH_ENV
from testsupport.fakepid1 import FakePid1
from testsupport.guest import seeded_memfd
from testsupport.luodproc import LuodProcess
from testsupport.util import memfd_facts
from testsupport.vm import guestlib

WORK = Path("/run/luod-test")
LONG_GRACE = "--grace=1h"
CRASHABLE = "testsupport.luod_crashable"
# Sessions x files handed to luod under GuestPid1, of these sizes (bytes).
SESSIONS = 5
SIZES = (4096, 200_000, 1 << 20)
# The steps killed at in stage 2, in this order, one luod each: the reclaim
# (files retrieved, none kept: retrieved again from the incoming sessions),
# the incoming session finished before its files are preserved again (only
# luod's kept references have them), and a new outgoing session the
# manifest does not name yet (its name is taken in the kernel). Each kill
# lands at the first time the luod started for it reaches the step (every
# session still needs it). The fast tier kills at every step.
CRASH_STEPS = (
    "reclaim.retrieved",
    "again.finished",
    "again.represerved",
)
# Under TCG, a luod start is seconds; a step never reached must not hang.
CRASH_TIMEOUT = 120.0
# How long FakePid1.start() waits for READY=1: made for the fast tier, too
# short for Python starting under TCG on a busy host.
fakepid1.READY_TIMEOUT = 180.0


def expected_files() -> dict[str, tuple[int, str, int]]:
    """'session/name' -> (size, seed, position) of every file handed over."""
    return {
        f"cs{s}/f{i}": (size, f"crash-{s}-{i}", (s * 7 + i) * 13)
        for s in range(SESSIONS)
        for i, size in enumerate(SIZES)
    }


def facts(fd: int) -> dict[str, Any]:
    return dataclasses.asdict(memfd_facts(fd))


class CrashableLuod(LuodProcess):
    """luod started as testsupport.luod_crashable (the real kernel, with
    the fault-injection hook of LUOD_TEST_CRASH_AT)."""

    @property
    def module(self) -> str:
        return CRASHABLE


class GuestPid1(FakePid1):
    """FakePid1 on /dev/liveupdate: the fd store of systemd >= 261 for luod
    in a VM without systemd, and PID 1's part of a kexec (its 'systemd'
    session), through the real kernel."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        # No fake kernel: FakePid1's FakeBackend is replaced before use.
        super().__init__(workdir, str(workdir / "no-fake-kernel"))
        self.kernel = KernelBackend()  # type: ignore[assignment]  # same operations
        self.luod = CrashableLuod(workdir, [], [], ready_timeout=180.0)

    def crash_at(self, spec: str) -> dict[str, Any]:
        """Start luod armed to kill itself at STEP[:N]; wait for it to die."""
        proc = self.spawn(None, LONG_GRACE, env={CRASH_ENV: spec})
        t0 = time.monotonic()
        got: dict[str, Any] = {"step": spec, "generation": self.luod.generation}
        try:
            got["rc"] = proc.wait(CRASH_TIMEOUT)
        except subprocess.TimeoutExpired:
            got["rc"] = None  # never reached: stop it, so that the next can run
            self.stop()
        got["seconds"] = round(time.monotonic() - t0, 2)
        got["killed"] = got["rc"] == -signal.SIGKILL
        return got

    def kexec_next_stage(self, out: dict[str, Any], name: str) -> None:
        """PID 1's kexec: stop luod (as shutdown.target does), carry the
        store, reboot(KEXEC). What the 'systemd' session holds is written
        into `out` for the next stage's restore()."""
        self.stop()
        self.settle()
        with self._cond:
            entries, holders = self._preserve_store()
        out["pid1_mapping"] = entries
        out["pid1_holders"] = holders  # kept open until the reboot syscall
        out["uptime_kexec"] = guestlib.uptime()
        guestlib.write_json(name, out)
        guestlib.kexec_next_stage()

    def restore(self, recorded: list[dict[str, Any]]) -> list[str]:
        """PID 1 after the kexec: the store back, by the same names."""
        with self._cond:
            self.store = self._restore_store(recorded)
        return self.names()


def retrieve_all(c: Client, files: dict[str, tuple[int, str, int]]) -> dict[str, Any]:
    """A copy of every file, at once: its facts, or the error luod gave."""
    got: dict[str, Any] = {}
    for key in files:
        session, name = key.split("/")
        try:
            fd = c.retrieve_fd(session, name)
        except VarlinkError as e:
            got[key] = {"error": e.error, **e.parameters}
            continue
        got[key] = facts(fd)
        os.close(fd)
    return got


def listing(c: Client) -> dict[str, list[str]]:
    return {s["name"]: sorted(f["name"] for f in s["files"]) for s in c.list_sessions()}


def kernel_names(c: Client) -> list[str]:
    return sorted(s["kernelName"] for s in c.list_sessions())


def luoctl_status(socket: str) -> dict[str, Any]:
    r = subprocess.run(
        [*guestlib.luoctl(socket), "status"], capture_output=True, text=True, timeout=120
    )
    return {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr}


def state_session_truth(out: dict[str, Any]) -> None:
    """Without a service manager luod's own state session carries custody,
    and luod's exit closes it: luod says so before, and the kernel has let
    go of every session after a kill -9 (its name can be created again)."""
    luod = LuodProcess(WORK / "plain", [], [LONG_GRACE], ready_timeout=180.0)
    luod.workdir.mkdir(parents=True, exist_ok=True)
    luod.start()
    with luod.client() as c:
        for i in range(2):
            fd = seeded_memfd(8192, f"plain-{i}")
            c.preserve_fd("plain", f"p{i}", fd, create_session=True)
            os.close(fd)
        out["status_before"] = c.status()
        out["check_before"] = c.check()
        names = kernel_names(c)
    out["luoctl_status_before"] = luoctl_status(luod.socket)
    assert luod.proc is not None
    luod.proc.send_signal(signal.SIGKILL)
    out["kill_rc"] = luod.proc.wait(30)
    out["log"] = luod.all_logs()
    be = KernelBackend()
    out["kernel_after"] = {}
    for name in names:
        try:
            os.close(be.create_session(name))  # closed at once: gone again
            out["kernel_after"][name] = "released"
        except LuoError as e:
            out["kernel_after"][name] = f"still held: {e}"


def stage1(out: dict[str, Any]) -> None:
    out["state_session"] = {}
    state_session_truth(out["state_session"])

    pid1 = GuestPid1(WORK / "pid1")
    pid1.start(LONG_GRACE)
    files = expected_files()
    out["files"] = {}
    with pid1.client() as c:
        for key, (size, seed, pos) in files.items():
            session, name = key.split("/")
            fd = seeded_memfd(size, seed, position=pos)
            c.preserve_fd(session, name, fd, create_session=True)
            out["files"][key] = facts(fd)
            os.close(fd)
        out["status"] = c.status()
        out["sessions"] = listing(c)
    out["store_before_kexec"] = pid1.names()
    out["log"] = pid1.all_logs()
    pid1.kexec_next_stage(out, "luod-crash-1.json")


def wait_preserved_again(c: Client, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = c.status()
        rec = status["reclaim"]
        if rec is None or rec["preservedAgainUSec"] is not None or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def stage2(out: dict[str, Any]) -> None:
    before = guestlib.results_dir() / "luod-crash-1.json"
    first = json.loads(before.read_text())
    pid1 = GuestPid1(WORK / "pid1")
    out["store_restored"] = pid1.restore(first["pid1_mapping"])
    out["crashes"] = []
    for step in CRASH_STEPS:
        out["crashes"].append(pid1.crash_at(step))
        out["crashes"][-1]["store_after"] = pid1.names()
    files = expected_files()
    t0 = time.monotonic()
    pid1.start(LONG_GRACE)
    out["ready_seconds"] = round(time.monotonic() - t0, 2)
    with pid1.client() as c:
        # At once, before anything else: no outage after the restarts.
        out["retrieved"] = retrieve_all(c, files)
        out["retrieved_seconds"] = round(time.monotonic() - t0, 2)
        out["status"] = c.status()
        out["sessions"] = listing(c)
        out["status_preserved_again"] = wait_preserved_again(c)
        out["check"] = c.check()
        out["kernel_names"] = kernel_names(c)
    out["store"] = pid1.names()
    out["log"] = pid1.all_logs()
    pid1.kexec_next_stage(out, "luod-crash-2.json")


def stage3(out: dict[str, Any]) -> None:
    before = guestlib.results_dir() / "luod-crash-2.json"
    second = json.loads(before.read_text())
    pid1 = GuestPid1(WORK / "pid1")
    out["store_restored"] = pid1.restore(second["pid1_mapping"])
    pid1.start(LONG_GRACE)
    with pid1.client() as c:
        out["retrieved"] = retrieve_all(c, expected_files())
        out["status"] = c.status()
        out["sessions"] = listing(c)
        out["kernel_names"] = kernel_names(c)
    out["store"] = pid1.names()
    out["log"] = pid1.all_logs()
    pid1.stop()


STAGES = {"crash": {1: stage1, 2: stage2, 3: stage3}}


def main() -> int:
    return guestlib.run_stage(STAGES, "luod", WORK / "pid1", timed=True)


if __name__ == "__main__":
    raise SystemExit(main())
