"""A fake service manager (PID 1) for one service, luod, in the fast tier.

`FakePid1` plays systemd >= 261 for luod: a datagram notify socket with
FDSTORE=1 / FDSTOREREMOVE=1 / FDNAME= / READY=1 / BARRIER=1 semantics (it
keeps every fd it is sent and deduplicates nothing), socket activation of
the varlink socket, restarts that pass the store back in LISTEN_FDS /
LISTEN_FDNAMES / LISTEN_PID, and the manager's own varlink socket answering
io.systemd.Manager GetInfo (the version luod checks). Its `kexec()` does
what PID 1 does over a live update (src/core/luo.c, src/shared/luo-util.c):
memfds of the store go into a LUO session 'systemd' of its own, session fds
are recorded by session name; after the (fake) kexec both are retrieved and
put back into the store under the same FDNAMEs.

luod runs on the fake kernel (testsupport.fakekernel) as a LuodProcess
(testsupport.luodproc), which keeps its logs and stops it; only how it is
started, with LISTEN_FDS, is this module's. A test that kills luod on
purpose starts it with `env` (LUOD_TEST_CRASH_AT of testsupport.crashhook,
a named step of luod's) or `kill_after` (the Nth return of a FakeBackend
call, which needs no hook in luod: `python -m testsupport.fakepid1
--kill-after=OP[:N] ...` is the fake-kernel entry point with that one
change), and waits for it with `launch()` and `wait_exit()`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from luod.client import Client
from luod.kernel.backend import LuoError
from testsupport import fakekernel
from testsupport.fakekernel import FakeBackend
from testsupport.luodproc import LuodProcess, fake_backend_args
from testsupport.util import make_memfd

REPO = Path(__file__).resolve().parents[1]  # luod's cwd: testsupport imports from there
READY_TIMEOUT = 20.0
CRASH_ENV = "LUOD_TEST_CRASH_AT"  # testsupport.crashhook's
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
        # The service: its logs, pid, client and stop are LuodProcess's; it
        # is started here (spawn), with the store in LISTEN_FDS.
        self.luod = LuodProcess(workdir, fake_backend_args(fake_kernel), [])
        self.notify_path = str(workdir / "notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.notify.bind(self.notify_path)
        self.notify.settimeout(0.1)
        # The varlink socket, as luod.socket makes it: the manager's, kept
        # across luod's restarts.
        self.varlink = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.varlink.bind(self.luod.socket)
        self.varlink.listen(16)
        self._cond = threading.Condition()
        self._ready = 0  # READY=1 messages seen
        # time.monotonic() of the last spawn and of the last READY=1.
        self.spawned_at = 0.0
        self.ready_at = 0.0
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
            self.ready_at = time.monotonic()
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

    @property
    def barriers(self) -> int:
        """BARRIER=1 messages handled so far (this class's own settle()'s
        among them)."""
        with self._cond:
            return self._barriers

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

    def log(self) -> str:
        """The log of the luod running now (or last)."""
        return self.luod.log()

    def all_logs(self) -> str:
        return self.luod.all_logs()

    @property
    def pid(self) -> int:
        return self.luod.pid

    def spawn(
        self,
        varlink_fd: int | None = None,
        *args: str,
        env: Mapping[str, str] | None = None,
        kill_after: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start luod with the store (and the varlink socket) in LISTEN_FDS.
        `env`: more environment (LUOD_TEST_CRASH_AT=STEP[:N]); without it
        LUOD_TEST_CRASH_AT is never passed on. `kill_after`: OP[:N], luod
        is killed (SIGKILL) when the Nth FakeBackend.OP call returns."""
        self.settle()
        self.luod.generation += 1
        varlink = self.varlink.fileno() if varlink_fd is None else varlink_fd
        with self._cond:
            passed = [("varlink", varlink)] + [(e.name, e.fd) for e in self.store]
        environ = dict(
            os.environ,
            NOTIFY_SOCKET=self.notify_path,
            PYTHONUNBUFFERED="1",
            LISTEN_FDS=str(len(passed)),
            LISTEN_FDNAMES=":".join(name for name, _ in passed),
            FAKE_PID1_FDS=",".join(str(fd) for _, fd in passed),
        )
        environ.pop("FDSTORE", None)
        environ.pop(CRASH_ENV, None)
        environ.update(env or {})
        if self.store_max is not None:
            environ["FDSTORE"] = str(self.store_max)
        module = [self.luod.module]
        if kill_after is not None:
            module = ["testsupport.fakepid1"]
            module.append(f"--kill-after={kill_after}")
        with open(self.luod.log_path, "wb") as logf:
            self.spawned_at = time.monotonic()
            self.luod.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _EXEC_WITH_LISTEN_FDS,
                    "-m",
                    *module,
                    *self.luod.backend_args,
                    # Not used when activated: tests check it never appears.
                    f"--socket={self.workdir / 'unused.sock'}",
                    f"--service-manager={self.manager_path}",
                    *args,
                ],
                pass_fds=[fd for _, fd in passed],
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=environ,
                cwd=REPO,
            )
        return self.luod.proc

    def start(
        self, *args: str, env: Mapping[str, str] | None = None, kill_after: str | None = None
    ) -> None:
        """Start luod and wait for READY=1; RuntimeError if it exits first."""
        if not self.launch(*args, env=env, kill_after=kill_after):
            proc = self.luod.proc
            assert proc is not None
            raise RuntimeError(f"luod exited with {proc.returncode}:\n{self.log()}")

    def launch(
        self, *args: str, env: Mapping[str, str] | None = None, kill_after: str | None = None
    ) -> bool:
        """Start luod; True once it is ready, False if it exited before
        (a test that kills it at a step of its start)."""
        with self._cond:
            seen = self._ready
        proc = self.spawn(None, *args, env=env, kill_after=kill_after)
        deadline = time.monotonic() + READY_TIMEOUT
        with self._cond:
            while self._ready == seen:
                if proc.poll() is not None:
                    return False
                if time.monotonic() > deadline:
                    raise RuntimeError(f"luod did not get ready:\n{self.log()}")
                self._cond.wait(0.05)
        return True

    def wait_exit(self, timeout: float = 10.0) -> int:
        """luod's exit status once it exited (-9: killed by SIGKILL);
        subprocess.TimeoutExpired if it is still running after `timeout`."""
        proc = self.luod.proc
        assert proc is not None
        return proc.wait(timeout)

    def kill9(self) -> None:
        proc = self.luod.proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        self.luod.stop()

    def client(self) -> Client:
        return self.luod.client()

    # --- kexec, as PID 1 does it ------------------------------------------------

    def kexec(self) -> None:
        """Stop luod (Conflicts=shutdown.target), carry the store over a fake
        kexec as systemd >= 261 does, and put it back into the store."""
        self.stop()
        self.settle()
        with self._cond:
            mapping, holders = self._preserve_store()
            fakekernel.kexec(self.fake_kernel)
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


# --- luod killed after a call into the fake kernel --------------------------------


def kill_after_call(op: str, nth: int) -> None:
    """Make this process kill itself (SIGKILL) when the `nth` call of
    FakeBackend.`op` returns: fault injection without any hook in luod, so
    that it works on every version of luod."""
    original: Callable[..., Any] = getattr(FakeBackend, op)
    left = nth

    def wrapper(self: FakeBackend, *args: Any, **kwargs: Any) -> Any:
        nonlocal left
        result = original(self, *args, **kwargs)
        left -= 1
        if left == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(FakeBackend, op, wrapper)


def main(argv: Sequence[str] | None = None) -> int:
    """`--kill-after=OP[:N]`, then testsupport.luod_fake's arguments."""
    parser = argparse.ArgumentParser(prog="python -m testsupport.fakepid1", add_help=False)
    parser.add_argument("--kill-after", required=True, metavar="OP[:N]")
    ours, theirs = parser.parse_known_args(argv)
    op, _, nth = ours.kill_after.partition(":")
    if not callable(getattr(FakeBackend, op, None)):
        raise SystemExit(f"--kill-after={ours.kill_after}: FakeBackend has no {op}()")
    kill_after_call(op, int(nth or "1"))
    from testsupport import luod_fake

    return luod_fake.main(theirs)


if __name__ == "__main__":
    sys.exit(main())
