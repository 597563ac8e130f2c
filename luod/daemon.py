"""luod, the daemon: wires backend, carrier, core and varlink together."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import signal
import socket
import sys
import time
from collections.abc import Sequence

import structlog

import luod
from luod import errors, notify, servicemanager
from luod import log as logsetup
from luod.carrier import Carrier, StateSessionCarrier
from luod.core import Custodian
from luod.fdstore import VARLINK_FDNAME, FdStoreCarrier, store_max_from_env
from luod.kernel import kexec
from luod.kernel.backend import Backend, KernelBackend, LuoError
from luod.notify import ListenFd
from luod.orchestrator import Orchestrator
from luod.peer import Peer
from luod.protocol import DEFAULT_SOCKET
from luod.server import LoadedKernel, LuodServer, make_registry

log = structlog.get_logger("luod")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|sec|m|min|h)?\s*$")
_UNIT = {
    None: 1.0,
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "sec": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> float:
    """'600', '10min', '1.5s', '2h' → seconds."""
    m = _DURATION.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration (try 600, 10min, 30s, 1h)")
    return float(m.group(1)) * _UNIT[m.group(2)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="luod",
        description=(
            "Keep file descriptors alive across a kexec with Linux's Live Update "
            "Orchestrator (/dev/liveupdate). Services hand fds to luod over varlink; "
            "after the kexec luod gives them back. Usually started by luod.socket."
        ),
    )
    p.add_argument("--version", action="version", version=f"luod {luod.__version__}")
    p.add_argument(
        "--socket",
        default=DEFAULT_SOCKET,
        help=f"varlink socket to listen on when not socket-activated (default: {DEFAULT_SOCKET})",
    )
    p.add_argument(
        "--backend",
        choices=("kernel", "fake"),
        default="kernel",
        help="kernel: /dev/liveupdate (default). fake: the test kernel of luod.kernel.fake, never chosen implicitly",
    )
    p.add_argument(
        "--fake-kernel", metavar="PATH", help="socket of the fake kernel (with --backend=fake)"
    )
    p.add_argument(
        "--grace",
        type=parse_duration,
        default=600.0,
        help="after a kexec, release what no owner claimed within this time (default: 10min)",
    )
    p.add_argument(
        "--carrier",
        choices=("auto", "state-session", "fdstore"),
        default="auto",
        help=(
            "how sessions and the manifest get across the kexec. fdstore: in luod's fd store, "
            "carried by PID 1 (systemd >= 261, FileDescriptorStorePreserve=yes). state-session: "
            "the manifest in a LUO session of luod's own, luod holds every session until the "
            "reboot syscall. auto (default): fdstore when $FDSTORE and $NOTIFY_SOCKET are set"
        ),
    )
    p.add_argument(
        "--service-manager",
        metavar="PATH",
        default=servicemanager.MANAGER_SOCKET,
        help=(
            "with the fdstore carrier: the service manager's varlink socket, asked for its "
            "version at start; unless it is systemd >= "
            f"{servicemanager.CARRIES_FDSTORE_OVER_KEXEC}, which carries the fd store over a "
            "kexec, the preflight check (luoctl check) fails (default: %(default)s)"
        ),
    )
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    p.add_argument("--log-format", choices=("logfmt", "json"), default="logfmt")
    return p


def make_backend(args: argparse.Namespace) -> Backend:
    if args.backend == "fake":
        if not args.fake_kernel:
            raise SystemExit("luod: --backend=fake needs --fake-kernel PATH")
        from luod.kernel.fake import FakeBackend

        return FakeBackend(args.fake_kernel)
    return KernelBackend()


BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def boot_identity(backend: Backend) -> str:
    """What tells this boot from the one a manifest was written in."""
    try:
        with open(BOOT_ID_PATH) as f:
            boot_id = f.read().strip()
    except OSError as e:
        log.warning("no-boot-id", path=BOOT_ID_PATH, reason=e.strerror)
        return ""  # never "the same boot": a restart is then taken for a kexec
    if backend.name == "fake":
        from luod.kernel.fake import FakeBackend

        assert isinstance(backend, FakeBackend)
        # A simulated kexec does not change the real boot id.
        return f"{boot_id}+fake-kexec-{backend.snapshot()['kexec_count']}"
    return boot_id


def choose_carrier(requested: str, environ: dict[str, str]) -> tuple[str, str]:
    """The carrier to use and why."""
    if requested != "auto":
        return requested, f"--carrier={requested}"
    if not environ.get("NOTIFY_SOCKET"):
        return "state-session", "no service manager ($NOTIFY_SOCKET is not set)"
    store_max = store_max_from_env(environ.get("FDSTORE"))
    if store_max is None:
        return "state-session", "the service has no fd store ($FDSTORE is not a positive number)"
    return "fdstore", f"the service has an fd store of {store_max} entries ($FDSTORE)"


def split_listen_fds(fds: list[ListenFd]) -> tuple[ListenFd | None, list[ListenFd]]:
    """The varlink socket (named 'varlink', or a lone fd when LISTEN_FDNAMES
    is missing) and everything else."""
    named = [f for f in fds if f.name == VARLINK_FDNAME]
    if not named and len(fds) == 1 and fds[0].name in ("unknown", ""):
        named = fds
    if not named:
        return None, fds
    return named[0], [f for f in fds if f is not named[0]]


def check_varlink_socket(entry: ListenFd) -> None:
    """Only a listening socket will do: a connected one means Accept=yes."""
    try:
        listening = _is_listening(entry.fd)
    except OSError:
        listening = False  # no socket at all
    if not listening:
        os.close(entry.fd)
        raise SystemExit(
            f"luod: the service manager passed fd {entry.fd} ('{entry.name}') as the varlink "
            "socket, but it is not a listening socket (a connected one: Accept=yes?). "
            "luod holds custody in one process; its socket unit needs Accept=no."
        )


def make_carrier(args: argparse.Namespace, backend: Backend, listen: list[ListenFd]) -> Carrier:
    """The carrier; it owns `listen` (LISTEN_FDS but the varlink socket)."""
    chosen, why = choose_carrier(args.carrier, dict(os.environ))
    if chosen == "fdstore" and not os.environ.get("NOTIFY_SOCKET"):
        raise SystemExit(
            "luod: --carrier=fdstore needs a service manager with an fd store "
            "($NOTIFY_SOCKET and FileDescriptorStoreMax=); there is none"
        )
    log.info("carrier-chosen", carrier=chosen, reason=why)
    if chosen == "fdstore":
        problem, version = servicemanager.fdstore_kexec_problem(args.service_manager)
        if problem is None:
            log.info("service-manager-carries-fdstore", version=version)
        else:
            # Within this boot the store still keeps everything across a
            # restart of luod; a kexec is what the preflight check refuses.
            log.warning("service-manager-drops-fdstore", version=version, reason=problem)
        return FdStoreCarrier(
            backend,
            listen,
            store_max_from_env(os.environ.get("FDSTORE")),
            kexec_problem=problem,
        )
    for entry in listen:
        # A store keeps its own copy: closing luod's releases nothing.
        os.close(entry.fd)
        log.warning(
            "listen-fd-closed",
            name=entry.name,
            fd=entry.fd,
            reason="the state-session carrier uses no fd store",
        )
    return StateSessionCarrier(backend)


def raise_nofile_limit() -> None:
    """Every held file is an fd; the default soft limit of 1024 is far too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _is_listening(fd: int) -> bool:
    s = socket.socket(fileno=os.dup(fd))
    try:
        return bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    finally:
        s.close()


# `systemctl kexec` starts kexec.target: services are stopped in order (their
# ExecStop= runs), then PID 1 carries the fd stores and jumps. (varlink's
# io.systemd.Manager.KExec skips the stopping, like `systemctl kexec --force`.)
# --no-block: luod is one of the services to be stopped.
PID1_KEXEC = ("systemctl", "--no-block", "kexec")


class Daemon:
    def __init__(
        self, core: Custodian, args: argparse.Namespace, activated: ListenFd | None = None
    ) -> None:
        self.core = core
        self.args = args
        # The varlink socket the service manager passed, checked already.
        self.activated = activated
        self.stopping = asyncio.Event()
        self.exit_code = 0
        self.loaded: LoadedKernel | None = None
        self.orchestrator = Orchestrator(on_subscribe=core.note_subscriber)

    @property
    def via_pid1(self) -> bool:
        """Under the fd-store carrier PID 1 must do the kexec: the manifest
        and session fds are in the fd store, which it carries on its way down."""
        return self.core.carrier.name == FdStoreCarrier.name

    def kexec_blocker(self, own_reboot: bool) -> str | None:
        """Why the kexec would fail now, checked before anything stops."""
        if not self.core.backend.kernel_loaded():
            return (
                "no kernel is loaded for kexec (luoctl load KERNEL loads one with kexec_file_load)"
            )
        if own_reboot and self.via_pid1:
            return "luod's state is in its fd store, which only PID 1 carries: use luoctl update or systemctl kexec"
        return None

    def load_kernel(
        self, kernel: str, initrd: str | None, cmdline: str | None, reuse: bool
    ) -> LoadedKernel:
        problem = kexec.image_problem(kernel)
        if problem is not None:
            raise errors.KernelUnusable("kernel", f"{kernel}: {problem}")
        if initrd is not None and not os.access(initrd, os.R_OK):
            raise errors.KernelUnusable("initrd", f"{initrd}: not readable")
        if reuse:
            with open("/proc/cmdline") as f:
                cmdline = f.read().strip()
        try:
            self.core.backend.load_kernel(kernel, initrd, cmdline or "")
        except LuoError as e:
            raise errors.KernelUnusable("kernel", f"{kernel}: {e.message}") from None
        self.loaded = LoadedKernel(
            kernel=kernel,
            initrd=initrd,
            commandLine=cmdline or "",
            loadedUSec=int(time.time() * 1e6),
        )
        log.info("kernel-loaded", kernel=kernel, initrd=initrd or "-", cmdline=cmdline or "")
        return self.loaded

    def unload_kernel(self) -> None:
        try:
            self.core.backend.unload_kernel()
        except LuoError as e:
            raise errors.KernelUnusable("kernel", e.message) from None
        self.loaded = None
        log.info("kernel-unloaded")

    async def jump(self) -> None:
        """The barrier passed: hand over to the kexec."""
        if not self.via_pid1:
            self.schedule_kexec(None)
            return
        log.warning(
            "kexec-via-pid1", sessions=len(self.core.sessions), command=" ".join(PID1_KEXEC)
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                *PID1_KEXEC, stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
            )
            _, err = await proc.communicate()
        except OSError as e:
            raise errors.NotReady(f"cannot run {' '.join(PID1_KEXEC)}: {e.strerror}") from None
        if proc.returncode != 0:
            raise errors.NotReady(
                f"{' '.join(PID1_KEXEC)} failed ({proc.returncode}): {err.decode(errors='replace').strip()}"
            )

    def schedule_kexec(self, peer: Peer | None) -> None:
        log.warning(
            "kexec-requested",
            by=peer.describe() if peer is not None else "update",
            sessions=len(self.core.sessions),
        )
        # After the reply went out.
        asyncio.get_running_loop().call_later(0.1, self._kexec)

    def _kexec(self) -> None:
        notify.notify("STOPPING=1\nSTATUS=Jumping into the next kernel")
        try:
            self.core.backend.reboot_kexec()
        except LuoError as e:
            log.error("kexec-failed", reason=str(e))
            notify.notify(f"READY=1\nSTATUS=kexec failed: {e}")
            return
        # Only the fake kernel returns from a successful kexec: this process
        # is now "the old userspace" and must go away without touching state.
        log.info("kexec-done", backend=self.core.backend.name)
        self.exit_code = 0
        self.kexeced = True
        self.stopping.set()

    kexeced = False

    def _listen_socket(self) -> socket.socket:
        if self.activated is not None:
            return socket.socket(fileno=self.activated.fd)
        path = self.args.socket
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(path)
        os.chmod(path, 0o666)  # access is decided per call from SO_PEERCRED
        return sock

    async def _settle(self) -> None:
        """After READY: carry custody on for what came over the kexec, one
        session per turn of the loop, so that calls are served in between
        (a client asking for its files first gets its session settled first)."""
        try:
            while self.core.settle():
                await asyncio.sleep(0)
        except Exception:
            log.exception("settle-failed")

    async def _grace_timer(self) -> None:
        while (deadline := self.core.next_deadline()) is not None:
            await asyncio.sleep(max(0.0, deadline - self.core.clock()))
            self.core.expire()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        report = self.core.start()
        self.orchestrator.expected_back = dict(self.core.previous_subscribers)
        sock = self._listen_socket()
        sock.setblocking(False)
        registry = make_registry(self.core, self)
        server = LuodServer(sock, registry)
        await server.start_serving()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        grace = asyncio.create_task(self._grace_timer())
        settler = asyncio.create_task(self._settle())
        status = f"Holding {len(self.core.sessions)} sessions"
        if report.state == "failed":
            status = f"Incoming manifest unusable: {report.error}"
        notify.notify(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")
        log.info(
            "listening",
            socket=sock.getsockname() or "(activated)",
            backend=self.core.backend.name,
            pid=os.getpid(),
        )
        await self.stopping.wait()
        self.orchestrator.end_all("luod is stopping")
        await asyncio.sleep(0.05)  # let the subscription streams end
        grace.cancel()
        settler.cancel()
        server.close()
        if not self.kexeced:
            if self.core.sessions and self.core.carrier.holds_after_exit:
                # What stays in the fd store must be what the next kexec carries.
                self.core.settle_all()
                log.info(
                    "stopping-custody-stays",
                    sessions=len(self.core.sessions),
                    carrier=self.core.carrier.name,
                )
            elif self.core.sessions:
                log.warning(
                    "stopping-releases-custody",
                    sessions=len(self.core.sessions),
                    files=sum(len(s.files) for s in self.core.sessions.values()),
                )
            self.core.close()
        return self.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logsetup.setup(args.log_level, json=args.log_format == "json")
    backend = make_backend(args)
    reason = backend.unavailable_reason()
    if reason is not None:
        log.error("no-liveupdate", reason=reason)
        notify.notify(f"STATUS={reason}\nERRNO=19")
        print(f"luod: {reason}", file=sys.stderr)
        return 1
    raise_nofile_limit()
    activated, rest = split_listen_fds(notify.listen_fds())
    if activated is not None:
        # Before anything is taken over: a refusal leaves the store as it is.
        check_varlink_socket(activated)
    carrier = make_carrier(args, backend, rest)
    core = Custodian(backend, carrier, grace=args.grace, boot_id=boot_identity(backend))
    return asyncio.run(Daemon(core, args, activated).run())


if __name__ == "__main__":
    sys.exit(main())
