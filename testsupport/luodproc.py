"""Run luod as a separate process, as tests need it: against the fake kernel
in the fast tier (through the test entry point testsupport.luod_fake, since
production luod has no fake backend), against /dev/liveupdate inside the
QEMU guests (luod.daemon itself)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from luod.client import Client
from testsupport.images import GOOD_CMDLINE, fake_bzimage
from testsupport.util import wait_until

READY_TIMEOUT = 60.0
REPO = str(Path(__file__).resolve().parents[1])

# luod on the real kernel, and luod on the fake kernel of testsupport.fakekernel.
LUOD_MODULE = "luod.daemon"
LUOD_FAKE_MODULE = "testsupport.luod_fake"


@dataclasses.dataclass
class LuodProcess:
    """One luod process; `restart()` starts the next one ("the next boot")."""

    workdir: Path
    # fake_backend_args(PATH) in the fast tier; empty (the real kernel, luod
    # started as itself) in the VM tiers.
    backend_args: list[str]
    extra_args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    generation: int = 0
    # Generous: under QEMU/TCG on a loaded 2-core host Python alone takes
    # seconds to start.
    ready_timeout: float = READY_TIMEOUT
    # RLIMIT_NOFILE (soft and hard) luod starts with; None: the caller's.
    nofile: int | None = None
    # Interpreter arguments before `-m MODULE` (the bench: -m cProfile -o FILE).
    python_args: list[str] = dataclasses.field(default_factory=list)
    # The checkout luod (and testsupport) is imported from: this one, or
    # another tree whose start bench.starts compares with this one's.
    repo: str = REPO

    @property
    def module(self) -> str:
        """What runs: the test entry point when a fake kernel is named."""
        return LUOD_FAKE_MODULE if self.backend_args else LUOD_MODULE

    @property
    def socket(self) -> str:
        return str(self.workdir / "io.luod")

    @property
    def log_path(self) -> Path:
        return self.workdir / f"luod-{self.generation}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def all_logs(self) -> str:
        return "".join(
            (self.workdir / f"luod-{g}.log").read_text()
            for g in range(1, self.generation + 1)
            if (self.workdir / f"luod-{g}.log").exists()
        )

    def start(self) -> None:
        self.generation += 1
        notify_path = str(self.workdir / f"notify-{self.generation}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(notify_path)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        notify.bind(notify_path)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path, PYTHONUNBUFFERED="1")
        # testsupport is no installed package: the test entry point needs
        # the tree on the path, wherever the tests run from. In the tree,
        # too: `-m` puts the working directory first on sys.path.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (self.repo, env.get("PYTHONPATH")) if p)
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    *self.python_args,
                    "-m",
                    self.module,
                    *self.backend_args,
                    f"--socket={self.socket}",
                    *self.extra_args,
                ],
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.repo,
                preexec_fn=None if self.nofile is None else self._limit_nofile,
            )
        # Ready means READY=1 on the notify socket, as systemd would see it.
        deadline = time.monotonic() + self.ready_timeout
        try:
            notify.settimeout(0.2)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"luod exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    msg = notify.recv(4096).decode()
                except TimeoutError:
                    continue
                if "READY=1" in msg.split("\n"):
                    return
            raise RuntimeError(f"luod did not get ready in {self.ready_timeout}s:\n{self.log()}")
        finally:
            notify.close()

    def _limit_nofile(self) -> None:
        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def client(self) -> Client:
        return Client(self.socket)

    def call_unheard(
        self, method: str, parameters: dict[str, Any], event: str, timeout: float = 30.0
    ) -> None:
        """Call `method` on a connection whose client reads nothing any more
        (shut down for reading before the call): luod serves the call, and
        sending its reply fails. Returns once luod logged one more `event`."""
        before = self.log().count(f"event={event} ")
        call = json.dumps({"method": method, "parameters": parameters}).encode() + b"\0"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(self.socket)
            sock.shutdown(socket.SHUT_RD)
            sock.sendall(call)
            wait_until(
                lambda: self.log().count(f"event={event} ") > before, f"luod logs {event}", timeout
            )

    def fd_count(self) -> int:
        """luod's open fds, counted when it holds none of those it opens for
        a moment on every accept (luod.peer: the peer's pidfd, its files in
        /proc): one counted in would make a fill to the open-file limit stop
        a place short, or a baseline one too high. A leaked one stays, and is
        counted once a wait for it to go is over."""
        deadline = time.monotonic() + 2.0
        while True:
            targets = self.fd_targets()
            passing = any(_passing(t) for t in targets)
            if not passing or time.monotonic() >= deadline:
                return len(targets)
            time.sleep(0.005)

    def fd_targets(self) -> list[str]:
        """What luod's open fds are (their /proc/PID/fd links); one closed
        while they are read is left out."""
        d = f"/proc/{self.pid}/fd"
        targets = []
        for fd in os.listdir(d):
            with contextlib.suppress(FileNotFoundError):
                targets.append(os.readlink(f"{d}/{fd}"))
        return targets

    def kexec(self) -> None:
        """A simulated kexec: luod jumps (the fake kernel serializes); the
        old luod exits; the next one starts as in the next boot."""
        image = fake_bzimage(self.workdir / "bzImage")
        with self.client() as c:
            c.call(
                "io.luod.Manager.LoadKernel", {"kernel": str(image), "commandLine": GOOD_CMDLINE}
            ).close()
            c.kexec()
        self.wait_exit()
        self.start()

    def wait_exit(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def fake_backend_args(fake_kernel: str) -> list[str]:
    """The arguments of testsupport.luod_fake that pick the fake kernel."""
    return [f"--fake-kernel={fake_kernel}"]


@contextlib.contextmanager
def running_luod(
    workdir: Path, fake_kernel: str | None, *args: str, nofile: int | None = None
) -> Iterator[LuodProcess]:
    """luod on the fake kernel at `fake_kernel`, or on the real one if None;
    `nofile`: its open-file limit."""
    backend = [] if fake_kernel is None else fake_backend_args(fake_kernel)
    p = LuodProcess(workdir, backend, list(args), nofile=nofile)
    p.start()
    try:
        yield p
    finally:
        p.stop()
        # Shown by pytest when the test failed.
        print(f"--- luod logs ({workdir}) ---\n{p.all_logs()}")


def _passing(target: str) -> bool:
    """Whether an fd is of a kind luod opens for a moment (pidfds, files
    in /proc)."""
    return target == "anon_inode:[pidfd]" or target.startswith("/proc/")
