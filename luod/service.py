"""luod's life as a service: the socket it listens on, and its run loop.

The listening socket is the one the service manager passed (socket
activation, checked to be a listening one), or one luod binds itself. The
run loop takes custody over (`Custodian.start`), serves varlink, tells the
service manager READY=1, then keeps two background tasks going — the grace
timer that releases what nobody claimed in time, and preserving again what
came over the kexec — until SIGTERM/SIGINT or a kexec, and on the way out
either leaves custody in the service manager's keeping or releases it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket

from asyncvarlink import VarlinkInterfaceRegistry

from luod import notify
from luod.custody import Custodian
from luod.log import get_logger
from luod.nextkernel import NextKernel
from luod.notify import ListenFd
from luod.orchestrator import Orchestrator
from luod.varlink.limits import Limits
from luod.varlink.transport import LuodServer

log = get_logger()

# LISTEN_FDNAMES name of the varlink socket (FileDescriptorName= in luod.socket).
VARLINK_FDNAME = "varlink"


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


def _is_listening(fd: int) -> bool:
    s = socket.socket(fileno=os.dup(fd))
    try:
        return bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    finally:
        s.close()


def listen_socket(activated: ListenFd | None, path: str) -> socket.socket:
    """The activated socket, else a new one bound at `path`."""
    if activated is not None:
        return socket.socket(fileno=activated.fd)
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(path)
    os.chmod(path, 0o666)  # access is decided per call from SO_PEERCRED
    return sock


class Service:
    """One run of luod, from taking custody over to stopping.

    `stopping` is set by SIGTERM/SIGINT, and by the wiring when a kexec
    returned as done (NextKernel's on_kexec; only with the fake kernel)."""

    def __init__(
        self,
        custodian: Custodian,
        orchestrator: Orchestrator,
        nextkernel: NextKernel,
        registry: VarlinkInterfaceRegistry,
        listener: socket.socket,
        stopping: asyncio.Event,
        limits: Limits | None = None,
    ) -> None:
        self.custodian = custodian
        self.orchestrator = orchestrator
        self.nextkernel = nextkernel
        self.registry = registry
        self.listener = listener
        self.stopping = stopping
        self.limits = Limits() if limits is None else limits

    async def _preserve_again(self) -> None:
        """After READY: carry custody on for what came over the kexec, one
        session per turn of the loop, so that calls are served in between
        (a client asking for its files first gets its session preserved
        again first)."""
        try:
            while self.custodian.preserve_again():
                await asyncio.sleep(0)
        except Exception:
            log.exception("preserve-again-failed")

    async def _grace_timer(self) -> None:
        custodian = self.custodian
        while (deadline := custodian.next_deadline()) is not None:
            await asyncio.sleep(max(0.0, deadline - custodian.clock()))
            custodian.expire()

    async def run(self) -> int:
        """Serve until stopped; the process's exit status."""
        loop = asyncio.get_running_loop()
        custodian = self.custodian
        report = custodian.start()
        self.orchestrator.expected_back = set(custodian.previous_subscribers)
        sock = self.listener
        sock.setblocking(False)
        server = LuodServer(sock, self.registry, self.limits)
        # Before luod's own kexec, replies still waiting that would hand a
        # file over go with their connections (their clients go with this
        # userspace): what they took is held again, and carried.
        self.nextkernel.before_kexec = server.abort_handing_over
        await server.start_serving()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        grace = asyncio.create_task(self._grace_timer())
        again = asyncio.create_task(self._preserve_again())
        status = f"Holding {custodian.session_count} sessions"
        if report.state == "failed":
            status = f"Incoming manifest unusable: {report.error}"
        notify.notify(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")
        log.info(
            "listening",
            socket=sock.getsockname() or "(activated)",
            backend=custodian.backend.name,
            pid=os.getpid(),
            max_connections=self.limits.max_connections,
            max_transit_fds=self.limits.max_transit_fds,
        )
        await self.stopping.wait()
        self.orchestrator.end_all("luod is stopping")
        await asyncio.sleep(0.05)  # let the subscription streams end
        grace.cancel()
        again.cancel()
        server.close()
        if not self.nextkernel.kexeced:
            # Replies still waiting go with their connections: what a take
            # would have handed over comes back (on_delivery) while custody
            # can still hold it, before it is handed to the service manager.
            server.abort_clients()
            await asyncio.sleep(0)
            self._stop_custody()
        return 0

    def _stop_custody(self) -> None:
        """luod stops without a kexec: custody stays in the service
        manager's keeping, or is released."""
        custodian = self.custodian
        if custodian.session_count and custodian.carrier.holds_after_exit:
            # What stays in the fd store must be what the next kexec carries.
            custodian.preserve_all_again()
            log.info(
                "stopping-custody-stays",
                sessions=custodian.session_count,
                carrier=custodian.carrier.name,
            )
        elif custodian.session_count:
            holdings = custodian.status()
            log.warning(
                "stopping-releases-custody", sessions=holdings.sessions, files=holdings.files
            )
        custodian.close()
