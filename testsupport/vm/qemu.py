"""Boot a LUO kernel under QEMU with the host's / as the guest's root.

The QEMU runner of both VM tiers: this bare tier (`run_guest`), and the
pieces the systemd tier (testsupport.systemd.harness) boots its disk image
with: the common QEMU command line, the results share, the run loop that
stamps stages, the result, and the build scripts' runner.

The guest runs vm/guest-init.sh as PID 1, which runs one Python program of
ours (with the same interpreter, hence the same venv, as the caller) once
per stage; the program may kexec into the next stage. Everything comes back
as files in `results`, a writable 9p share:

    serial.log            the serial console (kernel + init messages)
    stage-N.log           the program's stdout/stderr in stage N
    .guest/env            what init runs (written here)
    .guest/stage-N.started, .guest/stage-N.exit   init's bookkeeping
    anything the program writes (see guestlib.write_json)

Only TCG is used (`-accel tcg -cpu max`): /dev/kvm does not work on the
machines this project runs on. Every run is bounded by `timeout`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
INIT = REPO / "vm" / "guest-init.sh"
BUILD_KERNEL = REPO / "vm" / "build-kernel.sh"
HOST_DEPS = REPO / "vm" / "host-deps.sh"
QEMU = "qemu-system-x86_64"
STAGE_PARAM = "luod.test_stage"
# What a run leaves in its results folder besides the program's own files.
SERIAL_LOG = "serial.log"
GUEST_DIR = ".guest"  # init's bookkeeping (and what it runs)

ROOT_FLAGS = "trans=virtio,version=9p2000.L,msize=262144"
BASE_CMDLINE = (
    "console=ttyS0",
    "root=hostroot",
    "rootfstype=9p",
    # cache=loose: the guest's page cache serves what it read once, as a
    # local root would. Without it every stat() and read() of a Python
    # import is a round trip through QEMU's 9p server, which under TCG made
    # each Python start take seconds (the VM tier ran 1.6-1.9x longer). The
    # root is the host's /, read-only, and nothing the guest reads from it
    # changes during a run; what host and guest exchange goes through the
    # results share, which has no cache.
    f"rootflags={ROOT_FLAGS},cache=loose",
    "ro",
    "kho=on",
    "liveupdate=on",
    "panic=-1",
)


def uncached_root_cmdline() -> list[str]:
    """Kernel command line words that mount the guest's root without
    cache=loose (the last rootflags= wins; a kexec'd kernel gets the same
    words, guestlib.next_stage_cmdline copies /proc/cmdline): for
    measuring what the 9p round trips cost (--uncached-root of bench.run
    and the demo)."""
    return [f"rootflags={ROOT_FLAGS}"]


class GuestError(AssertionError):
    """A guest run did not do what was expected; the message has the logs."""


@dataclasses.dataclass(frozen=True)
class GuestResult:
    """What one QEMU run left behind."""

    results: Path
    serial_log: Path
    command: tuple[str, ...]
    returncode: int | None  # None: killed on timeout
    timed_out: bool
    duration: float  # seconds from QEMU start to QEMU exit
    # Seconds after QEMU start at which the host first saw init reach stage N
    # (polled, so up to ~50 ms late), and the guest's uptime at that moment.
    stage_seen: Mapping[int, float]
    stage_uptime: Mapping[int, float]
    # Exit status of the program in stages where it returned (not kexec'd).
    stage_exit: Mapping[int, int]

    @property
    def stages(self) -> list[int]:
        return sorted(self.stage_uptime)

    def read_json(self, name: str) -> Any:
        with open(self.results / name) as f:
            return json.load(f)

    def stage_log(self, stage: int) -> str:
        try:
            return (self.results / f"stage-{stage}.log").read_text(errors="replace")
        except OSError:
            return ""

    def serial_text(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")
        except OSError:
            return ""

    def summary(self) -> dict[str, Any]:
        """The run in numbers (also saved as results/run.json)."""
        return {
            "command": list(self.command),
            "returncode": self.returncode,
            "timed_out": self.timed_out,
            "duration": round(self.duration, 2),
            "stage_seen": {str(k): round(v, 2) for k, v in sorted(self.stage_seen.items())},
            "stage_uptime": {str(k): v for k, v in sorted(self.stage_uptime.items())},
            "stage_exit": {str(k): v for k, v in sorted(self.stage_exit.items())},
        }

    def report(self, serial_lines: int = 120) -> str:
        """Everything useful for a failure message."""
        parts = [
            f"QEMU: {shlex.join(self.command)}",
            f"returncode={self.returncode} timed_out={self.timed_out} "
            f"duration={self.duration:.1f}s stages={self.stages} exits={dict(self.stage_exit)}",
            f"results: {self.results}",
        ]
        for stage in self.stages:
            log = self.stage_log(stage).rstrip()
            if log:
                parts.append(f"--- stage-{stage}.log ---\n{tail(log, 60)}")
        parts.append(
            f"--- serial console (last {serial_lines} lines of {self.serial_log}) ---\n"
            + tail(self.serial_text(), serial_lines)
        )
        return "\n".join(parts)

    def check(self, final_stage: int) -> None:
        """Raise GuestError unless stages 1..final_stage all ran and the
        program returned 0 in `final_stage`."""
        problems = []
        if self.timed_out:
            problems.append("QEMU was killed on timeout")
        missing = [s for s in range(1, final_stage + 1) if s not in self.stage_uptime]
        if missing:
            problems.append(f"stages never started: {missing}")
        early = {s: rc for s, rc in self.stage_exit.items() if s < final_stage}
        if early:
            problems.append(f"program returned instead of kexec'ing: {early}")
        rc = self.stage_exit.get(final_stage)
        if rc != 0:
            problems.append(f"stage {final_stage} exit status: {rc}")
        if problems:
            raise GuestError("; ".join(problems) + "\n" + self.report())


def tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def qemu_unavailable_reason(install: bool = True) -> str | None:
    """None if QEMU can boot our VMs here, else why not.

    When qemu-system-x86_64 is missing and `install` is true, try
    vm/host-deps.sh qemu first (root or password-less sudo)."""
    if shutil.which(QEMU) is None and install:
        subprocess.run([str(HOST_DEPS), "qemu"], check=False, stdout=sys.stderr, timeout=900)
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed and vm/host-deps.sh qemu could not install it"
    try:
        out = subprocess.run(
            [QEMU, "-nodefaults", "-device", "help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{QEMU} does not run: {e}"
    if out.returncode != 0:
        return f"{QEMU} does not run: {out.stderr.strip()[:500]}"
    if "virtio-9p-pci" not in out.stdout:
        return f"{QEMU} has no virtio-9p-pci (no VirtFS support)"
    return None


def run_script(argv: Sequence[str], what: str, timeout: float) -> str:
    """Run one of the vm/ build scripts: stderr passes through (progress),
    the last stdout line is its answer (a path). Raises RuntimeError with
    the stderr tail on failure or when it printed nothing."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True
        )
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
        err.seek(0)
        errors = err.read()
    sys.stderr.write(errors)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{tail(errors, 60)}")
    lines = stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{what} printed no path:\n{tail(errors, 60)}")
    return lines[-1]


def build_kernel(variant: str, timeout: float = 3600.0) -> Path:
    """vm/build-kernel.sh VARIANT: the cached bzImage, built if needed
    (a cold build takes minutes; a cached one, milliseconds)."""
    what = f"vm/build-kernel.sh {variant}"
    path = Path(run_script([str(BUILD_KERNEL), variant], what, timeout))
    if not path.is_file():
        raise RuntimeError(f"{what} printed {path}, which is not a file")
    return path


# The packages the guest imports from the repository.
SOURCES = ("luod", "testsupport", "tests", "bench")


def compile_sources(python: Path) -> None:
    """Byte-compile the project's sources on the host, where it is quick.

    The guest sees them through the read-only 9p root and cannot cache what
    it compiles, so every Python process in it would compile every module
    it imports from here again: under TCG about 2 s per process. compileall
    writes the __pycache__ files even under PYTHONDONTWRITEBYTECODE, and
    skips what is up to date."""
    subprocess.run(
        [str(python), "-m", "compileall", "-q", *(str(REPO / d) for d in SOURCES)],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=300,
    )


def _program_argv(python: Path, script: Path | str, results: Path) -> list[str]:
    """How init starts the guest program.

    A file inside a package (directories with __init__.py) runs as a module
    (`python -m pkg.mod`, with the package's parent on PYTHONPATH) so that it
    can use relative imports; any other file runs as a script; a string is
    Python source, saved into the results share and run as a script."""
    if isinstance(script, str):
        (results / ".guest" / "program.py").write_text(script)
        return [str(python), f"{_IN_RESULTS}.guest/program.py"]
    script = script.resolve()
    if not script.is_file():
        raise FileNotFoundError(script)
    parts = [script.stem]
    root = script.parent
    while (root / "__init__.py").is_file():
        parts.insert(0, root.name)
        root = root.parent
    if len(parts) == 1:
        return [str(python), str(script)]
    return ["env", f"PYTHONPATH={root}", str(python), "-m", ".".join(parts)]


# An argv element starting with this names a file in the results share, whose
# path differs in the guest (init exports it as LUOD_VM_RESULTS).
_IN_RESULTS = "\0results/"


def _shell_word(arg: str) -> str:
    if arg.startswith(_IN_RESULTS):
        return '"$LUOD_VM_RESULTS"/' + shlex.quote(arg[len(_IN_RESULTS) :])
    return shlex.quote(arg)


def _write_env(results: Path, argv: Sequence[str], env: Mapping[str, str]) -> None:
    lines = ["# written by testsupport/vm/qemu.py; sourced by vm/guest-init.sh"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    lines.append("set -- " + " ".join(_shell_word(a) for a in argv))
    (results / ".guest" / "env").write_text("\n".join(lines) + "\n")


def run_guest(
    kernel: Path,
    script: Path | str,
    results: Path,
    timeout: float,
    *,
    stage: int = 1,
    guest_env: Mapping[str, str] | None = None,
    extra_cmdline: Sequence[str] = (),
    python: Path | None = None,
    memory: str = "1G",
    smp: int = 2,
    one_thread: bool = True,
) -> GuestResult:
    """Boot `kernel` and run `script` in the guest, starting at `stage`.

    `python` defaults to the interpreter running this (the project's venv);
    through the 9p root the guest runs the very same file. The guest sees
    LUOD_VM_STAGE, LUOD_VM_RESULTS (its path for `results`), LUOD_VM_KERNEL
    (`kernel`, for kexec'ing into the next stage), LUOD_VM_CMDLINE_BASE and
    `guest_env`. QEMU is killed after `timeout` seconds; the result says so.
    `one_thread`: see qemu_command().
    """
    kernel = kernel.resolve()
    if not os.access(INIT, os.X_OK):
        raise PermissionError(f"{INIT} is not executable: the guest kernel cannot run it")
    results = prepare_results(results)

    py = Path(python) if python is not None else Path(sys.executable)
    compile_sources(py)
    argv = _program_argv(py.absolute(), script, results)
    env = {
        "LUOD_VM_KERNEL": str(kernel),
        "LUOD_VM_REPO": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # the root is read-only anyway
        **(guest_env or {}),
    }
    _write_env(results, argv, env)

    cmdline = [*BASE_CMDLINE, f"init={INIT}", *extra_cmdline, f"{STAGE_PARAM}={stage}"]
    command = (
        *qemu_command(kernel, cmdline, results, memory=memory, smp=smp, one_thread=one_thread),
        "-device", "virtio-rng-pci",
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", results_share(results),
    )  # fmt: skip

    result = run_qemu(command, results, timeout, poll=0.05)
    write_summary(result)
    return result


def prepare_results(results: Path) -> Path:
    """The results folder, resolved, emptied of what a run before left in
    .guest/ and serial.log (a stage seen there would be this run's)."""
    results = results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    guest_dir = results / GUEST_DIR
    if guest_dir.exists():
        shutil.rmtree(guest_dir)
    guest_dir.mkdir()
    (results / SERIAL_LOG).unlink(missing_ok=True)
    return results


def qemu_command(
    kernel: Path,
    cmdline: Sequence[str],
    results: Path,
    *,
    memory: str,
    smp: int,
    one_thread: bool = True,
) -> tuple[str, ...]:
    """What every VM of ours starts with: TCG, no default devices, no
    reboot (a reboot ends the run; a kexec does not go through QEMU), the
    serial console into results/serial.log, `kernel` booted directly.

    `one_thread` (tests): TCG runs every vCPU on one host thread
    (thread=single) rather than a thread each. A test guest ran as fast
    that way (117 s either way for two VM-tier tests), and two such guests
    at once each ran as fast as one alone, where two guests of a thread
    per vCPU on 2 cores each took twice as long: a guest's vCPU spins on a
    lock or an IPI while the host has the vCPU it waits for off its core.
    So `make test` runs the two QEMU tiers at once. The bench and the
    demos (False) keep a thread per vCPU: their timings model a machine
    with `smp` CPUs."""
    return (
        QEMU,
        "-accel", "tcg,thread=single" if one_thread else "tcg",
        "-cpu", "max",
        "-m", memory,
        "-smp", str(smp),
        "-nographic",
        "-nodefaults",
        "-no-reboot",
        "-serial", f"file:{qemu_opt(results / SERIAL_LOG)}",
        "-kernel", str(kernel.resolve()),
        "-append", " ".join(cmdline),
    )  # fmt: skip


def results_share(results: Path) -> str:
    """The -virtfs option of the writable results share (tag `results`)."""
    return f"local,path={qemu_opt(results)},mount_tag=results,security_model=none"


def write_summary(result: GuestResult, **extra: Any) -> None:
    """results/run.json: the run in numbers, plus `extra`."""
    summary = {**result.summary(), **extra}
    (result.results / "run.json").write_text(json.dumps(summary, indent=2) + "\n")


def run_qemu(command: Sequence[str], results: Path, timeout: float, poll: float) -> GuestResult:
    """Run QEMU, noting when each stage starts (by the host's clock); kill it
    after `timeout` seconds. QEMU's own output goes to results/qemu.log."""
    guest_dir = results / GUEST_DIR
    seen: dict[int, float] = {}
    start = time.monotonic()
    timed_out = False
    with open(results / "qemu.log", "wb") as qemu_log:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT
        )
        try:
            while True:
                try:
                    proc.wait(timeout=poll)
                    break
                except subprocess.TimeoutExpired:
                    pass
                _note_stages(guest_dir, seen, time.monotonic() - start)
                if time.monotonic() - start > timeout:
                    timed_out = True
                    proc.kill()
                    proc.wait()
                    break
        finally:
            if proc.poll() is None:  # interrupted (KeyboardInterrupt...)
                proc.kill()
                proc.wait()
    duration = time.monotonic() - start
    _note_stages(guest_dir, seen, duration)

    uptimes: dict[int, float] = {}
    exits: dict[int, int] = {}
    for f in guest_dir.glob("stage-*.started"):
        uptimes[int(f.stem.split("-")[1])] = float(f.read_text().strip() or "nan")
    for f in guest_dir.glob("stage-*.exit"):
        exits[int(f.stem.split("-")[1])] = int(f.read_text().strip() or "-1")
    return GuestResult(
        results=results,
        serial_log=results / SERIAL_LOG,
        command=tuple(command),
        returncode=None if timed_out else proc.returncode,
        timed_out=timed_out,
        duration=duration,
        stage_seen=seen,
        stage_uptime=uptimes,
        stage_exit=exits,
    )


def qemu_opt(path: Path) -> str:
    """A path inside a QEMU option list, where a comma is written twice."""
    return str(path).replace(",", ",,")


def _note_stages(guest_dir: Path, seen: dict[int, float], now: float) -> None:
    for name in os.listdir(guest_dir):
        if name.startswith("stage-") and name.endswith(".started"):
            n = int(name[len("stage-") : -len(".started")])
            seen.setdefault(n, now)
