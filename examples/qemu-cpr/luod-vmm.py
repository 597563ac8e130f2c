#!/usr/bin/python3
"""luod-vmm: run a QEMU VM whose guest RAM is a memfd held by luod, so that
the VM survives a kexec of its host (QEMU's cpr-reboot mode).

    luod-vmm run NAME [--memory 16M] [--deadline 20] [options] -- QEMU-ARGS...
    luod-vmm qmp NAME COMMAND [ARGUMENTS-JSON]

`run` starts the VM, or resumes it after a kexec, and follows luod's update
barrier (io.luod.Manager.Subscribe) for as long as it runs:

- cold start: a memfd of --memory bytes becomes the guest's RAM
  (`memory-backend-file,share=on,mem-path=/proc/self/fd/N`) and is handed
  to luod at once (session NAME.ram, file "ram"), which preserves it in the
  kernel and keeps it across any number of kexecs;
- prepare: QEMU must answer and its guest run, else the update is refused;
- freeze: QMP `stop`, then `migrate` in cpr-reboot mode with the
  x-ignore-shared capability into a second memfd (only device state goes in,
  ~0.3 MB; RAM stays where it is), handed to luod (session NAME.state,
  file "state"); then acknowledge. A save that fails or does not finish
  before luod's deadline refuses the update (luod aborts it for everyone);
- aborted: the guest runs on where it was (QMP `cont`), the saved state is
  discarded;
- after the kexec (the service is started again, after luod-reclaim.service):
  both memfds come back from luod, QEMU starts with the same arguments plus
  `-incoming defer`, loads the state (`migrate-incoming`) and `cont`: the
  guest runs on from where it was stopped. The state is then discarded; the
  RAM stays in luod's custody for the next update.

QEMU gets two monitors: a private one for luod-vmm (a socketpair) and
RUNTIME/NAME/qmp.sock for the operator (`luod-vmm qmp NAME query-status`).
SIGTERM (the service being stopped, also on the way into the kexec) stops
QEMU and leaves luod's sessions alone. A VM that is shut down for good keeps
its RAM in luod until the next cold start of NAME (which discards it) or
`luoctl discard NAME.ram`.

Only Python's standard library and luod's client (luod.client). Options for
tests and demos: --timeline FILE (one JSON line per step: the guest's pause
and its parts), --hash-ram (sha256 of all guest RAM when saved and when
taken back), --peek ADDR (a u32 of guest RAM at those moments).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import luod.client
from luod.client import VarlinkError

RAM_FILE = "ram"
STATE_FILE = "state"
DEFAULT_RUNTIME = "/run/luod-vmm"
# What is left of luod's deadline for acknowledging, after the save.
ACK_MARGIN = 1.0
QMP_TIMEOUT = 60.0  # one QMP command, outside a freeze (nested TCG is slow)


class VmmError(Exception):
    pass


def log(message: str) -> None:
    print(f"luod-vmm: {message}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    if t and t[-1] in units:
        return int(t[:-1]) * units[t[-1]]
    return int(t)


def sd_notify(message: str) -> None:
    """sd_notify(3) without libsystemd: READY=1, STATUS=..."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s,
        contextlib.suppress(OSError),
    ):
        s.sendto(message.encode(), path)


# --- QMP ---------------------------------------------------------------------


class QMP:
    """A QMP connection: one command at a time, each with an id, so that a
    reply that comes after its command timed out (QEMU hung for a while) is
    recognised and dropped; events are kept aside."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self.next_id = 0

    @classmethod
    def over(cls, sock: socket.socket, timeout: float) -> QMP:
        q = cls(sock)
        q._read(time.monotonic() + timeout)  # the greeting
        q.execute("qmp_capabilities", timeout=timeout)
        return q

    @classmethod
    def connect(cls, path: str, timeout: float) -> QMP:
        end = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(path)
                return cls.over(s, max(0.1, end - time.monotonic()))
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
            except BaseException:
                s.close()
                raise

    def close(self) -> None:
        self.sock.close()

    def _read(self, end: float) -> dict[str, Any]:
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("QEMU did not answer on QMP in time")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError("QEMU did not answer on QMP in time") from None
            if not data:
                raise ConnectionError("QEMU closed its QMP monitor")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return dict(json.loads(line))

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float = QMP_TIMEOUT
    ) -> Any:
        self.next_id += 1
        msg: dict[str, Any] = {"execute": command, "id": self.next_id}
        if arguments:
            msg["arguments"] = arguments
        end = time.monotonic() + timeout
        self.sock.settimeout(max(0.001, timeout))
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read(end)
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != self.next_id:
                continue  # the late answer to a command that timed out
            if "error" in reply:
                err = reply["error"]
                raise VmmError(f"QMP {command}: {err.get('class')}: {err.get('desc')}")
            return reply.get("return")

    def status(self, timeout: float = QMP_TIMEOUT) -> str:
        return str(self.execute("query-status", timeout=timeout)["status"])

    def wait_migration(self, end: float) -> dict[str, Any]:
        """Poll query-migrate until completed (or failed)."""
        while True:
            info = dict(self.execute("query-migrate", timeout=max(0.001, end - time.monotonic())))
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise VmmError(f"migration {status}: {info.get('error-desc', '')}")
            if time.monotonic() > end:
                raise TimeoutError(f"migration still {status} at the deadline")
            time.sleep(0.01)

    def cpr_reboot(self, timeout: float) -> None:
        """The migration settings of cpr-reboot with RAM left in place."""
        caps = [{"capability": "x-ignore-shared", "state": True}]
        self.execute("migrate-set-capabilities", {"capabilities": caps}, timeout)
        self.execute("migrate-set-parameters", {"mode": "cpr-reboot"}, timeout)


# --- timeline ----------------------------------------------------------------


class Timeline:
    """--timeline FILE: one JSON line per step, with CLOCK_MONOTONIC and
    CLOCK_REALTIME of this boot and its boot id (a guest's clocks do not
    survive a kexec: whoever reads this ties each boot to an outside clock)."""

    def __init__(self, path: str | None, name: str) -> None:
        self.path = path
        self.name = name
        try:
            self.boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            self.boot_id = ""

    def mark(self, event: str, **data: Any) -> None:
        record = {
            "vm": self.name,
            "event": event,
            "monotonic": time.monotonic(),
            "realtime": time.time(),
            "boot_id": self.boot_id,
            "pid": os.getpid(),
            **data,
        }
        if self.path is None:
            return
        # No fsync: it would lengthen the pause it measures; the file system
        # is synced on the way into the kexec.
        line = json.dumps(record, sort_keys=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


# --- the VM ------------------------------------------------------------------


class VM:
    def __init__(self, args: argparse.Namespace) -> None:
        self.name: str = args.name
        self.size = parse_size(args.memory)
        self.qemu_binary: str = args.qemu
        self.qemu_args: list[str] = list(args.qemu_args)
        self.deadline: float = args.deadline
        self.hash_ram: bool = args.hash_ram
        self.peek: list[int] = [int(a, 0) for a in args.peek]
        self.rundir = Path(args.runtime_dir) / self.name
        self.timeline = Timeline(args.timeline, self.name)
        self.ram_session = f"{self.name}.ram"
        self.state_session = f"{self.name}.state"
        self.ram_fd = -1
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QMP | None = None
        self.stopping = False  # QEMU is being stopped on purpose
        self.saved = False  # the guest is stopped and its state in luod
        if self.size <= 0 or self.size % (1 << 20):
            raise VmmError(f"--memory {args.memory}: a positive number of MiB, please")

    # --- luod ---

    def sessions(self, c: luod.client.Client) -> dict[str, list[str]]:
        return {
            s["name"]: [f["name"] for f in s["files"]]
            for s in c.list_sessions(owner=os.getuid())
            if s["name"] in (self.ram_session, self.state_session)
        }

    def discard(self, c: luod.client.Client, session: str) -> None:
        with contextlib.suppress(VarlinkError):
            c.discard_session(session)

    # --- QEMU ---

    def command(self, incoming: bool, monitor_fd: int) -> list[str]:
        """QEMU's command line: the same before and after the kexec, but for
        -incoming and the fd numbers."""
        size_m = self.size >> 20
        cmd = [
            self.qemu_binary,
            "-name", self.name,
            "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", "memory-backend=ram0",
            "-m", f"{size_m}M",
            # Guest RAM is the memfd luod holds, mapped shared.
            "-object",
            f"memory-backend-file,id=ram0,size={size_m}M,"
            f"mem-path=/proc/self/fd/{self.ram_fd},share=on",
            # luod-vmm's own monitor: one end of a socketpair.
            "-chardev", f"socket,id=luod-vmm,fd={monitor_fd}",
            "-object", "monitor-qmp,id=luod-vmm-qmp,chardev=luod-vmm",
            # The operator's monitor (luod-vmm qmp NAME ...).
            "-chardev", f"socket,id=operator,path={self.rundir / 'qmp.sock'},server=on,wait=off",
            "-object", "monitor-qmp,id=operator-qmp,chardev=operator",
        ]  # fmt: skip
        if incoming:
            cmd += ["-incoming", "defer"]
        return cmd + self.qemu_args

    def start_qemu(self, incoming: bool, extra_fds: Sequence[int] = ()) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cmd = self.command(incoming, theirs.fileno())
        log(f"starting {' '.join(cmd)}")
        self.timeline.mark("qemu-spawn", incoming=incoming)
        with contextlib.suppress(FileNotFoundError):
            (self.rundir / "qmp.sock").unlink()
        try:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, pass_fds=(self.ram_fd, theirs.fileno(), *extra_fds)
            )
        finally:
            theirs.close()
        self.qmp = QMP.over(mine, QMP_TIMEOUT)
        self.timeline.mark("qmp-ready", qemu_pid=self.proc.pid)
        threading.Thread(target=self._watch, args=(self.proc,), daemon=True).start()

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        rc = proc.wait()
        if not self.stopping:
            log(f"QEMU exited on its own (status {rc}); luod-vmm exits too")
            self.timeline.mark("qemu-exited", status=rc)
            os.kill(os.getpid(), signal.SIGTERM)

    def stop_qemu(self) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def status_file(self, state: str, **extra: Any) -> None:
        info = {
            "vm": self.name,
            "state": state,
            "qemu_pid": self.proc.pid if self.proc else None,
            "vmm_pid": os.getpid(),
            **extra,
        }
        tmp = self.rundir / ".status.json.tmp"
        tmp.write_text(json.dumps(info, indent=1) + "\n")
        tmp.replace(self.rundir / "status.json")

    def ram_facts(self, fd: int, what: str) -> dict[str, Any]:
        """--peek values and the --hash-ram digest of guest RAM (memfd `fd`)."""
        facts: dict[str, Any] = {}
        for addr in self.peek:
            facts[f"peek_{addr:#x}"] = struct.unpack("<I", os.pread(fd, 4, addr))[0]
        if self.hash_ram:
            t = time.monotonic()
            h = hashlib.sha256()
            offset = 0
            while chunk := os.pread(fd, 1 << 20, offset):
                h.update(chunk)
                offset += len(chunk)
            facts["ram_sha256"] = h.hexdigest()
            facts["hash_seconds"] = time.monotonic() - t
        if facts:
            self.timeline.mark(f"ram-{what}", **facts)
        return facts

    # --- cold start and resume ---

    def cold_start(self, c: luod.client.Client) -> None:
        self.timeline.mark("cold-start")
        for stale in self.sessions(c):
            log(f"discarding {stale} (left by an earlier run of {self.name})")
            self.discard(c, stale)
        self.ram_fd = os.memfd_create(f"luod-vmm:{self.name}:ram", os.MFD_CLOEXEC)
        os.ftruncate(self.ram_fd, self.size)
        # luod preserves it in the kernel now: its size is fixed from here on.
        c.preserve_fd(self.ram_session, RAM_FILE, self.ram_fd, create_session=True)
        self.timeline.mark("ram-preserved", bytes=self.size)
        self.start_qemu(incoming=False)
        assert self.qmp is not None
        status = self.qmp.status()
        if status != "running":
            raise VmmError(f"QEMU is {status} after its start")
        self.timeline.mark("running", how="cold")

    def resume(self, c: luod.client.Client) -> None:
        """After a kexec: the RAM and the saved state from luod, QEMU with
        -incoming, load, cont."""
        self.timeline.mark("restore-start")
        # A copy: luod keeps custody of the RAM (and carries it over the
        # next kexec too, with whatever the guest writes into it).
        self.ram_fd = c.retrieve_fd(self.ram_session, RAM_FILE)
        state_fd = c.retrieve_fd(self.state_session, STATE_FILE)
        self.timeline.mark("fds-retrieved", state_bytes=os.fstat(state_fd).st_size)
        self.ram_facts(self.ram_fd, "retrieved")
        try:
            self.start_qemu(incoming=True, extra_fds=(state_fd,))
            assert self.qmp is not None
            self.qmp.cpr_reboot(QMP_TIMEOUT)
            self.qmp.execute("migrate-incoming", {"uri": f"file:/proc/self/fd/{state_fd}"})
            info = self.qmp.wait_migration(time.monotonic() + QMP_TIMEOUT)
            self.timeline.mark("restored", migration=info)
            status = self.qmp.status()
            if status != "running":  # paused: the old QEMU was stopped first
                self.qmp.execute("cont")
            status = self.qmp.status()
            if status != "running":
                raise VmmError(f"QEMU is {status} after cont")
            self.timeline.mark("running", how="restored")
        finally:
            os.close(state_fd)
        # Loaded: the state is of no use any more (the RAM is).
        self.discard(c, self.state_session)
        self.timeline.mark("state-discarded")

    # --- the barrier ---

    def prepare(self) -> str | None:
        """Why the update must not go on, if QEMU is not well."""
        try:
            assert self.qmp is not None
            status = self.qmp.status(timeout=max(1.0, self.deadline - ACK_MARGIN))
        except (OSError, VmmError) as e:
            return f"QEMU does not answer: {e}"
        return None if status == "running" else f"the guest is {status}, not running"

    def save(self, c: luod.client.Client, deadline: float) -> None:
        """stop + cpr-reboot migration into a memfd, handed to luod; within
        `deadline` (time.monotonic())."""
        assert self.qmp is not None

        def left() -> float:
            t = deadline - time.monotonic()
            if t <= 0:
                raise TimeoutError("the save did not finish before luod's deadline")
            return t

        self.qmp.execute("stop", timeout=left())
        self.timeline.mark("stopped")
        self.qmp.cpr_reboot(left())
        state_fd = os.memfd_create(f"luod-vmm:{self.name}:state", os.MFD_CLOEXEC)
        try:
            # QEMU opens it by path (as root, or as this process's user).
            uri = f"file:/proc/{os.getpid()}/fd/{state_fd}"
            self.qmp.execute("migrate", {"uri": uri}, timeout=left())
            info = self.qmp.wait_migration(time.monotonic() + left())
            size = os.fstat(state_fd).st_size
            self.timeline.mark(
                "saved",
                state_bytes=size,
                downtime_ms=info.get("downtime"),
                total_ms=info.get("total-time"),
            )
            left()
            self.discard(c, self.state_session)  # from an earlier, aborted update
            c.preserve_fd(self.state_session, STATE_FILE, state_fd, create_session=True)
            self.timeline.mark("state-preserved", bytes=size)
        finally:
            os.close(state_fd)
        self.ram_facts(self.ram_fd, "saved")

    def recover(self, c: luod.client.Client) -> None:
        """The update did not happen: let the guest run on where it is.
        QEMU may not answer for a while (hung, or stopped): keep asking."""
        self.discard(c, self.state_session)
        assert self.qmp is not None
        end = time.monotonic() + 300
        while True:
            try:
                migration = self.qmp.execute("query-migrate").get("status")
                if migration in ("setup", "active", "device", "pre-switchover", "cancelling"):
                    with contextlib.suppress(VmmError):
                        self.qmp.execute("migrate_cancel")
                    time.sleep(0.05)
                    continue
                status = self.qmp.status()
                if status == "running":
                    break
                if status not in ("paused", "postmigrate", "finish-migrate"):
                    raise VmmError(f"cannot resume a guest in state {status}")
                self.qmp.execute("cont")
            except TimeoutError as e:
                if time.monotonic() > end:
                    raise VmmError("QEMU did not answer for 300 s after the abort") from e
                log(f"QEMU does not answer yet ({e}); asking again")
        self.timeline.mark("running", how="after-abort")

    def start(self, acks: luod.client.Client) -> None:
        """Resume the VM if luod holds its RAM and a saved state, else
        start it afresh."""
        have = self.sessions(acks)
        if STATE_FILE in have.get(self.state_session, []) and RAM_FILE in have.get(
            self.ram_session, []
        ):
            self.resume(acks)
        else:
            self.cold_start(acks)
        self.status_file("running")
        sd_notify("READY=1\nSTATUS=the guest runs")

    def follow(self) -> None:
        """Start the VM, then follow luod's updates for as long as it runs.
        If luod goes away (restarted, or stopped on the way into the
        kexec), connect again: after a kexec this process is gone anyway;
        if luod comes back without one, a saved guest runs on."""
        started = False
        while True:
            try:
                with luod.client.connect() as events, luod.client.connect() as acks:
                    sub = events.subscribe(self.name, deadline=self.deadline)
                    first = next(sub)
                    self.timeline.mark(first["phase"], kexec_count=first.get("kexecCount"))
                    log(f"subscribed to luod's updates: {first['phase']}")
                    if not started:
                        self.start(acks)
                        started = True
                    elif self.saved:
                        log("luod is back and no kexec happened: the guest runs on")
                        self.recover(acks)
                        self.saved = False
                        self.status_file("running")
                    for ev in sub:
                        self.on_event(ev, acks)
            except (ConnectionError, FileNotFoundError, VarlinkError) as e:
                if not started:
                    raise
                why = "the kexec is under way?" if self.saved else "luod restarting?"
                log(f"lost luod ({e}; {why}); connecting again")
                time.sleep(1)

    def on_event(self, ev: dict[str, Any], acks: luod.client.Client) -> None:
        """One event of luod's barrier."""
        phase = ev["phase"]
        self.timeline.mark(phase, update=ev.get("update"), reason=ev.get("reason"))
        log(
            f"update {ev.get('update')}: {phase}"
            + (f" ({ev['reason']})" if ev.get("reason") else "")
        )
        if phase == "prepare":
            self.answer(acks, ev, self.prepare())
        elif phase == "freeze":
            self.status_file("saving", update=ev["update"])
            now = time.monotonic()
            luods = ev["deadlineUSec"] / 1e6 - time.time() if ev.get("deadlineUSec") else 1e9
            end = now + min(self.deadline, luods) - ACK_MARGIN
            try:
                self.save(acks, end)
            except (OSError, VmmError, VarlinkError) as e:
                self.timeline.mark("save-failed", error=str(e))
                log(f"the save failed: {e}")
                self.answer(acks, ev, f"could not save the VM: {e}")
                self.recover(acks)
                self.status_file("running")
                return
            self.saved = True
            self.status_file("saved", update=ev["update"])
            self.answer(acks, ev, None)
            sd_notify("STATUS=saved for the kexec")
        elif phase == "aborted":
            if self.saved or self.prepare() is not None:
                self.recover(acks)
            self.saved = False
            self.status_file("running")
            sd_notify("STATUS=the guest runs (the update was aborted)")

    def answer(self, acks: luod.client.Client, ev: dict[str, Any], refusal: str | None) -> None:
        sent = time.monotonic()
        try:
            acks.acknowledge(
                ev["subscription"], ev["update"], ev["phase"], refusal is not None, refusal
            )
            self.timeline.mark(f"{ev['phase']}-acked", refused=refusal, sent_monotonic=sent)
        except VarlinkError as e:  # the update is over already (aborted)
            log(f"acknowledging {ev['phase']}: {e}")
            self.timeline.mark(f"{ev['phase']}-ack-failed", error=str(e))


def cmd_run(args: argparse.Namespace) -> int:
    try:
        vm = VM(args)
    except (VmmError, ValueError) as e:
        log(str(e))
        return 2
    vm.rundir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def on_term(_sig: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    vm.timeline.mark("vmm-start")
    try:
        vm.follow()
    except SystemExit:
        log("stopping (the RAM and any saved state stay with luod)")
    except (VmmError, VarlinkError, OSError) as e:
        log(f"failed: {e}")
        vm.stop_qemu()
        return 1
    finally:
        vm.stop_qemu()
    return 0


def cmd_qmp(args: argparse.Namespace) -> int:
    q = QMP.connect(str(Path(args.runtime_dir) / args.name / "qmp.sock"), args.timeout)
    try:
        arguments = json.loads(args.arguments) if args.arguments else None
        print(json.dumps(q.execute(args.command, arguments, args.timeout), indent=1))
    finally:
        q.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="luod-vmm", description=__doc__.split("\n")[0])
    p.add_argument("--runtime-dir", default=DEFAULT_RUNTIME)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run (or resume) the VM NAME")
    r.add_argument("name")
    r.add_argument("--memory", default="16M", help="guest RAM (default 16M)")
    r.add_argument(
        "--deadline", type=float, default=20.0, help="seconds for each phase of an update"
    )
    r.add_argument("--qemu", default="qemu-system-x86_64")
    r.add_argument("--timeline", help="append one JSON line per step to this file")
    r.add_argument("--hash-ram", action="store_true", help="sha256 of guest RAM on save/resume")
    r.add_argument("--peek", action="append", default=[], help="a u32 of guest RAM to note")
    q = sub.add_parser("qmp", help="one QMP command on the operator's monitor of NAME")
    q.add_argument("name")
    q.add_argument("command")
    q.add_argument("arguments", nargs="?")
    q.add_argument("--timeout", type=float, default=QMP_TIMEOUT)
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" is QEMU's.
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    if args.cmd == "run":
        args.qemu_args = argv[cut + 1 :]
        return cmd_run(args)
    if cut < len(argv):
        p.error("QEMU arguments (after --) are for run only")
    return cmd_qmp(args)


if __name__ == "__main__":
    sys.exit(main())
