"""Boot a Debian sid root with systemd 262 as PID 1 and luod installed, under
QEMU, and run a test program in it once per boot stage.

The pieces:

- vm/build-root.sh: the cached debootstrap'd sid root (`build_root()`).
- vm/build-image.sh: root + luod of this working tree + the kernel at
  /boot/vmlinuz -> a sparse ext4 image (`build_image()`), one per test run;
  every boot uses it with `snapshot=on`, so each QEMU run starts clean (the
  writes of one run do survive its kexecs: QEMU keeps running).
- `boot()`: QEMU with the image as virtio-blk, virtio-rng, and `results`
  as a writable 9p share mounted at /results by results.mount. systemd starts
  luod-test-stage.service after multi-user.target, which runs
  /usr/lib/luod-test/test-stage (vm/systemd/): it runs our program
  (`results/.guest/stage-script`, bash) with the helpers of guest/ next to
  it (lib.sh to source; memfd.py, bulk.py, qemucpr.py). The program either kexecs into
  the next stage (`stage_kexec` in lib.sh: `luoctl kexec /boot/vmlinuz
  --append "... luod.test_stage=N+1"`, which ends in `systemctl kexec`) or
  returns, and the VM powers off.

Everything comes back as files in `results` (see vm/systemd/test-stage):
serial.log, qemu.log, stage-N.log, stage-N/ (steps, journal, boot times),
.guest/stage-N.{started,kexec,exit}, run.json. QEMU is killed after
`timeout`. QEMU runs as testsupport.vm.qemu runs it for the bare tier, and
the result is its GuestResult, whose check() and report() fit this layout
too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testsupport.vm import qemu
from testsupport.vm.qemu import GuestError, GuestResult

REPO = qemu.REPO
BUILD_ROOT = REPO / "vm" / "build-root.sh"
BUILD_IMAGE = REPO / "vm" / "build-image.sh"
BUILD_DEB = REPO / "tools" / "build-deb.sh"
# What every stage program has at hand in /results/.guest/ (lib.sh, and the
# Python helpers it and the bench call).
GUEST_HELPERS = Path(__file__).resolve().parent / "guest"
STAGE_PARAM = qemu.STAGE_PARAM
# LUOD_SYSTEMD_ANALYZE=1: every stage also keeps `systemd-analyze blame` and
# `critical-chain` of its boot (stage-N/boot-blame.txt, boot-critical-chain.txt).
# They cost about 25 s a stage under TCG, so a run asks for them when a boot is
# what it looks into.
ANALYZE_PARAM = "luod.test_analyze=1"

BASE_CMDLINE = (
    "console=ttyS0",
    "root=/dev/vda",
    "rootfstype=ext4",
    "rw",
    "init=/lib/systemd/systemd",
    "kho=on",
    "liveupdate=on",
    "panic=-1",
)

__all__ = [
    "BASE_CMDLINE",
    "GuestError",
    "GuestResult",
    "Stage",
    "Step",
    "assert_kexec_reached",
    "boot",
    "build_deb",
    "build_image",
    "build_root",
    "describe",
    "kexec_cycles",
    "stage",
]


def build_root(timeout: float = 1800.0) -> Path:
    """vm/build-root.sh: the cached sid root (about a minute when cold)."""
    return Path(qemu.run_script([str(BUILD_ROOT)], "vm/build-root.sh", timeout))


def build_image(
    image: Path,
    kernel: Path,
    root: Path | None = None,
    timeout: float = 600.0,
    test_units: Path | None = None,
    deb: Path | None = None,
) -> Path:
    """vm/build-image.sh: luod of this working tree in a copy of the root
    (from its Debian package `deb` when given, see build_deb()), with the
    test-only units and programs of the folder `test_units` (installed, not
    enabled)."""
    argv = [str(BUILD_IMAGE), "--kernel", str(kernel)]
    if root is not None:
        argv += ["--root", str(root)]
    if deb is not None:
        argv += ["--deb", str(deb)]
    if test_units is not None:
        argv += ["--test-units", str(test_units)]
    return Path(qemu.run_script([*argv, str(image)], "vm/build-image.sh", timeout))


def build_deb(out: Path, version: str | None = None, timeout: float = 600.0) -> Path:
    """tools/build-deb.sh (make deb): luod's package built from this working
    tree into `out`, its man pages rendered first (tools/gendocs.py); as
    `version` instead of luod's own when given (an upgrade to install)."""
    from tools import gendocs  # argparse-manpage and shtab: the dev extras

    docs = out / "docs"
    for rel, text in gendocs.render().items():
        (docs / rel).parent.mkdir(parents=True, exist_ok=True)
        (docs / rel).write_text(text)
    env = [f"LUOD_DOCS={docs}"]
    if version is not None:
        env.append(f"LUOD_DEB_VERSION={version}")
    argv = ["env", *env, str(BUILD_DEB), str(out)]
    return Path(qemu.run_script(argv, "tools/build-deb.sh", timeout))


def boot(
    image: Path,
    kernel: Path,
    script: Path,
    results: Path,
    timeout: float,
    *,
    stage: int = 1,
    extra_cmdline: Sequence[str] = (),
    memory: str = "2G",
    smp: int = 2,
    extra_files: Sequence[Path] = (),
    one_thread: bool = True,
) -> GuestResult:
    """Boot `image` with `kernel` and run the bash program `script` in each
    stage, starting at `stage`. QEMU is killed after `timeout` seconds.
    `extra_files` are copied into /results/.guest/ next to the helpers.
    `one_thread`: see qemu.qemu_command()."""
    results = qemu.prepare_results(results)
    guest_dir = results / qemu.GUEST_DIR
    for helper in GUEST_HELPERS.iterdir():
        if helper.is_file() and helper.suffix in {".sh", ".py"}:
            shutil.copy2(helper, guest_dir / helper.name)
    for extra in extra_files:
        shutil.copy2(extra, guest_dir / extra.name)
    shutil.copy2(script, guest_dir / "stage-script")

    cmdline = [*BASE_CMDLINE, *extra_cmdline, f"{STAGE_PARAM}={stage}"]
    if os.environ.get("LUOD_SYSTEMD_ANALYZE") == "1":
        cmdline.append(ANALYZE_PARAM)
    command = (
        *qemu.qemu_command(
            kernel, cmdline, results, memory=memory, smp=smp, one_thread=one_thread
        ),
        "-drive", f"file={qemu.qemu_opt(image.resolve())},if=virtio,format=raw,snapshot=on",
        "-device", "virtio-rng-pci",
        "-virtfs", qemu.results_share(results),
    )  # fmt: skip

    result = qemu.run_qemu(command, results, timeout, poll=0.1)
    cycles = kexec_cycles(result)
    qemu.write_summary(result, kexec_cycle={str(n): round(v, 2) for n, v in cycles.items()})
    return result


def kexec_cycles(result: GuestResult) -> dict[int, float]:
    """Seconds from `luoctl kexec` in stage N to the start of stage N+1,
    by the host's clock: when the host saw stage N start, plus the guest
    uptime from then to the kexec request (.guest/stage-N.kexec), to when
    the host saw stage N+1 start. Polled, so ~0.1 s coarse."""
    cycles: dict[int, float] = {}
    for n in result.stages:
        requested = _float(result.results / ".guest" / f"stage-{n}.kexec")
        if n + 1 not in result.stage_seen or n not in result.stage_seen or requested != requested:
            continue
        at = result.stage_seen[n] + (requested - result.stage_uptime[n])
        cycles[n] = result.stage_seen[n + 1] - at
    return cycles


def _float(path: Path) -> float:
    try:
        return float(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


@dataclasses.dataclass(frozen=True)
class Step:
    """One command the guest program ran with lib.sh's `step`."""

    name: str
    rc: int
    out: str
    err: str

    def ok(self) -> bool:
        return self.rc == 0

    def json(self) -> Any:
        return json.loads(self.out)

    def journal(self) -> list[dict[str, Any]]:
        """`journalctl -o json` output, one entry per line; the step must
        have succeeded."""
        assert self.ok(), self
        return [json.loads(line) for line in self.out.splitlines() if line.startswith("{")]

    def props(self) -> dict[str, str]:
        """`systemctl show -p A,B` output as a dict."""
        pairs = (line.partition("=") for line in self.out.splitlines() if "=" in line)
        return {k: v for k, _, v in pairs}

    def __str__(self) -> str:
        return f"step {self.name}: rc={self.rc}\n--- stdout ---\n{self.out}\n--- stderr ---\n{self.err}"


@dataclasses.dataclass(frozen=True)
class Stage:
    """What the guest program left in results/stage-N/."""

    number: int
    path: Path

    def step(self, name: str) -> Step:
        def read(suffix: str) -> str:
            try:
                return (self.path / f"{name}.{suffix}").read_text(errors="replace")
            except OSError:
                return ""

        rc_text = read("rc").strip()
        if not rc_text:
            raise GuestError(f"stage {self.number} has no step {name!r} (in {self.path})")
        return Step(name, int(rc_text), read("out"), read("err"))

    def text(self, name: str) -> str:
        try:
            return (self.path / name).read_text(errors="replace")
        except OSError:
            return ""

    def steps(self) -> list[str]:
        return self.text("steps.txt").split()

    def boot_seconds(self) -> dict[str, float]:
        """systemd-analyze time of this boot: kernel, userspace, total (s)."""
        return parse_analyze_time(self.text("boot-time.txt"))


def stage(result: GuestResult, n: int) -> Stage:
    return Stage(n, result.results / f"stage-{n}")


def assert_kexec_reached(result: GuestResult, n: int = 1) -> None:
    """Stage n's `stage_kexec` (lib.sh) got the VM into stage n+1.

    luoctl kexec usually dies with the system before it can note its exit
    status; a status it did note must be 0, and stage n+1 must come."""
    s = stage(result, n)
    rc = s.text("kexec.rc").strip()
    if rc not in ("", "0") or n + 1 not in result.stage_uptime:
        raise AssertionError(
            f"luoctl kexec (exit status {rc or 'not recorded'}):\n{s.text('kexec.out')}\n"
            f"--- luod ---\n{s.text('journal-luod.txt')}\n{result.report()}"
        )


_ANALYZE_PART = re.compile(r"([0-9.]+(?:min|ms|s|us)(?:\s+[0-9.]+(?:ms|s|us))?)\s+\((\w+)\)")
_ANALYZE_TOTAL = re.compile(r"=\s*([0-9.]+(?:min|ms|s|us)(?:\s+[0-9.]+(?:ms|s|us))?)")


def _seconds(text: str) -> float:
    total = 0.0
    for num, unit in re.findall(r"([0-9.]+)(min|ms|us|s)", text):
        total += float(num) * {"min": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}[unit]
    return total


def parse_analyze_time(text: str) -> dict[str, float]:
    """'Startup finished in 2.4s (kernel) + 15.8s (userspace) = 18.2s' ->
    {'kernel': 2.4, 'userspace': 15.8, 'total': 18.2}; plus
    'multi-user.target reached after 15.1s in userspace' -> 'multi-user'."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("Startup finished"):
            for value, part in _ANALYZE_PART.findall(line):
                found[part] = _seconds(value)
            m = _ANALYZE_TOTAL.search(line)
            if m:
                found["total"] = _seconds(m.group(1))
        m2 = re.search(r"multi-user\.target reached after (.+) in userspace", line)
        if m2:
            found["multi-user"] = _seconds(m2.group(1))
    return found


def describe(result: GuestResult) -> str:
    """A short account of a run for logs: durations per stage."""
    parts = [f"QEMU ran {result.duration:.1f}s ({shlex.join(result.command[:6])} ...)"]
    cycles = kexec_cycles(result)
    for n in result.stages:
        times = stage(result, n).boot_seconds()
        parts.append(
            f"stage {n}: host saw it at {result.stage_seen.get(n, float('nan')):.1f}s, "
            f"guest uptime {result.stage_uptime[n]:.1f}s, systemd-analyze {times}"
        )
        if n in cycles:
            parts.append(
                f"kexec {n} -> {n + 1}: {cycles[n]:.1f}s from `luoctl kexec` to stage {n + 1}"
            )
    return "\n".join(parts)
