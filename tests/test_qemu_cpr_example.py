"""examples/qemu-cpr/ without QEMU: the boot sector, luod-vmm's QEMU command
line and arguments, its QMP client. The VM itself runs in the systemd tier
(tests/systemd/test_qemu_cpr.py)."""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "qemu-cpr"


def _load(name: str, filename: str) -> ModuleType:
    loader = importlib.machinery.SourceFileLoader(name, str(EXAMPLE / filename))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


vmm = _load("luod_vmm", "luod-vmm.py")
tiny = _load("tinyguest", "tinyguest.py")


def test_boot_sector_is_one_bootable_sector() -> None:
    sector = tiny.boot_sector()
    assert len(sector) == 512 and sector[-2:] == b"\x55\xaa"
    # The tick loop: sti; hlt; inc dword [COUNTER]; jmp back to sti.
    loop = b"\xfb\xf4\x66\xff\x06" + struct.pack("<H", tiny.COUNTER) + b"\xeb\xf7"
    assert loop in sector
    # The counter is in another 4 KiB page than the code (0x7C00).
    assert tiny.COUNTER >> 12 != 0x7C00 >> 12
    assert tiny.STACK >> 12 not in (0x7C00 >> 12, tiny.COUNTER >> 12)


def test_pattern_is_what_the_loop_writes() -> None:
    data = tiny.pattern()
    assert len(data) == tiny.PATTERN_END - tiny.PATTERN_START
    first = struct.unpack_from("<3I", data)
    assert first == tuple((tiny.SEED + i * tiny.STEP) & 0xFFFFFFFF for i in range(3))


def _run_args(*argv: str) -> argparse.Namespace:
    """What `luod-vmm ARGV` would run the VM with (run itself not called)."""
    captured: list[argparse.Namespace] = []

    def fake_run(args: argparse.Namespace) -> int:
        captured.append(args)
        return 0

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vmm, "cmd_run", fake_run)
        assert vmm.main(list(argv)) == 0
    return captured[0]


def test_qemu_arguments_follow_the_double_dash() -> None:
    args = _run_args("run", "vm1", "--memory", "4M", "--", "-machine", "pc", "--", "x")
    assert args.name == "vm1" and args.memory == "4M"
    assert args.qemu_args == ["-machine", "pc", "--", "x"]


def test_command_line_maps_the_memfd_and_adds_incoming_only_to_resume(tmp_path: Path) -> None:
    args = _run_args(
        "--runtime-dir", str(tmp_path), "run", "vm1", "--memory", "4M", "--", "-accel", "tcg"
    )
    vm = vmm.VM(args)
    vm.ram_fd = 7
    cold = vm.command(incoming=False, monitor_fd=9)
    warm = vm.command(incoming=True, monitor_fd=9)
    backend = cold[cold.index("-object") + 1]
    assert backend == "memory-backend-file,id=ram0,size=4M,mem-path=/proc/self/fd/7,share=on"
    i = cold.index("-machine")
    assert cold[i : i + 4] == ["-machine", "memory-backend=ram0", "-m", "4M"]
    assert "-incoming" not in cold and cold[-2:] == ["-accel", "tcg"]
    assert warm[: len(cold) - 2] == cold[:-2]
    assert warm[-4:] == ["-incoming", "defer", "-accel", "tcg"]


def test_memory_must_be_whole_mib(tmp_path: Path) -> None:
    args = _run_args("--runtime-dir", str(tmp_path), "run", "vm1", "--memory", "1536K")
    with pytest.raises(vmm.VmmError):
        vmm.VM(args)
    assert vmm.parse_size("2G") == 2 << 30 and vmm.parse_size("16MiB") == 16 << 20


@pytest.fixture
def qemu_side() -> Iterator[tuple[socket.socket, socket.socket]]:
    mine, theirs = socket.socketpair()
    yield mine, theirs
    mine.close()
    theirs.close()


def _serve(sock: socket.socket, replies: list[bytes]) -> threading.Thread:
    """A fake QMP server: the greeting, then for each command read, the
    next canned reply (with the command's id where it says {id})."""

    def run() -> None:
        sock.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        buf = b""
        for reply in replies:
            while b"\n" not in buf:
                buf += sock.recv(4096)
            line, _, buf = buf.partition(b"\n")
            sent = json.loads(line)
            sock.sendall(reply.replace(b"{id}", str(sent["id"]).encode()))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_qmp_drops_late_answers_and_keeps_events(
    qemu_side: tuple[socket.socket, socket.socket],
) -> None:
    mine, theirs = qemu_side
    _serve(
        theirs,
        [
            b'{"return": {}, "id": {id}}\n',  # qmp_capabilities
            # A late answer to a command that timed out, an event, then ours.
            b'{"return": {}, "id": 999}\n{"event": "STOP"}\n'
            b'{"return": {"status": "running"}, "id": {id}}\n',
            b'{"error": {"class": "GenericError", "desc": "nope"}, "id": {id}}\n',
        ],
    )
    q = vmm.QMP.over(mine, 5.0)
    assert q.status(5.0) == "running"
    assert [e["event"] for e in q.events] == ["STOP"]
    with pytest.raises(vmm.VmmError, match="nope"):
        q.execute("cont", timeout=5.0)


def test_qmp_times_out(qemu_side: tuple[socket.socket, socket.socket]) -> None:
    mine, theirs = qemu_side
    _serve(theirs, [b'{"return": {}, "id": {id}}\n'])  # then silence: QEMU hangs
    q = vmm.QMP.over(mine, 5.0)
    with pytest.raises(TimeoutError):
        q.execute("stop", timeout=0.2)
