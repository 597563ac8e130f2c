"""A QEMU VM through the host's live update (tests/systemd/test_qemu_cpr.py,
`make demo-vm`): the run's files and the guest's pause, part by part.

The guest program is tests/systemd/guest/qemu_cpr.sh; the VM is
examples/qemu-cpr/ (luod-vmm.py, tinyguest.py, luod-vmm@.service), put next
to it in /results/.guest/.

Clocks. The pause spans a kexec, and no guest clock does: CLOCK_MONOTONIC
starts again at zero in the next kernel. luod-vmm's --timeline records each
step with its boot's CLOCK_MONOTONIC; the stage program ties each boot's
monotonic clock to the host's (qemucpr.py anchor: the mtime the host's
kernel gives a file written into the 9p results share). So each step is
placed on the host's clock, good to about +-0.02 s (the anchor's 9p round
trip, the host's coarse file times, the guest's clock against the host's
over a minute or so). The next kernel's start is its CLOCK_MONOTONIC zero.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from testsupport.systemd import harness

EXAMPLE = harness.REPO / "examples" / "qemu-cpr"
GUEST = harness.REPO / "tests" / "systemd" / "guest" / "qemu_cpr.sh"
EXTRA_FILES = (
    EXAMPLE / "luod-vmm.py",
    EXAMPLE / "tinyguest.py",
    EXAMPLE / "luod-vmm@.service",
)
# Two boots of ~20 s, QEMU inside under TCG, an aborted update (the VMM's
# 6 s deadline) and a kexec: ~2 minutes on a quiet 2-core host, ~4 when
# other VMs share its cores.
TIMEOUT = 900.0
PRECISION = 0.02


@dataclasses.dataclass(frozen=True)
class Anchor:
    """A boot's CLOCK_MONOTONIC tied to the host's CLOCK_REALTIME."""

    monotonic: float
    host: float
    boot_id: str

    @classmethod
    def load(cls, path: Path) -> Anchor:
        data = json.loads(path.read_text())
        return cls(float(data["monotonic"]), float(data["host_realtime"]), str(data["boot_id"]))

    def host_time(self, monotonic: float) -> float:
        return self.host + (monotonic - self.monotonic)


def timeline(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def last(events: list[dict[str, Any]], name: str, **match: Any) -> dict[str, Any]:
    found = [
        e for e in events if e["event"] == name and all(e.get(k) == v for k, v in match.items())
    ]
    if not found:
        raise AssertionError(f"luod-vmm's timeline has no {name} {match or ''}")
    return found[-1]


def _unit_usec(step: harness.Step, unit: str, key: str) -> float:
    """A *TimestampMonotonic property (s) of `unit` in a `systemctl show -p
    Id,...` step about several units (a block each, blank-line separated)."""
    for block in step.out.split("\n\n"):
        props = dict(line.partition("=")[::2] for line in block.splitlines() if "=" in line)
        if props.get("Id") == unit:
            return int(props[key]) / 1e6
    raise AssertionError(f"no {unit} in:\n{step}")


def _journal_event(step: harness.Step, event: str) -> float:
    """CLOCK_MONOTONIC (s) of luod's last log line `event=EVENT` in a
    `journalctl -o json` step."""
    hits = [
        int(e["__MONOTONIC_TIMESTAMP"]) / 1e6
        for e in step.journal()
        if str(e.get("MESSAGE", "")).startswith(f"event={event} ")
    ]
    if not hits:
        raise AssertionError(f"luod never logged {event}:\n{step.out[-3000:]}")
    return hits[-1]


@dataclasses.dataclass(frozen=True)
class Pause:
    """The guest's pause across the host's kexec, host seconds."""

    parts: list[tuple[str, float]]  # in order; they add up to `total`
    total: float  # QMP stop (the guest stops) -> running again
    freeze_to_running: float  # luod's freeze event -> running again
    hashing: float  # --hash-ram inside the pause (a test's check, not needed)
    details: dict[str, float]
    facts: dict[str, Any]

    def json(self) -> dict[str, Any]:
        return {
            "parts": [{"part": p, "seconds": round(s, 4)} for p, s in self.parts],
            "total": round(self.total, 4),
            "freeze_to_running": round(self.freeze_to_running, 4),
            "hashing": round(self.hashing, 4),
            "total_without_hashing": round(self.total - self.hashing, 4),
            "details": {k: round(v, 4) for k, v in self.details.items()},
            "facts": self.facts,
            "precision": PRECISION,
        }


def pause(result: harness.GuestResult) -> Pause:
    """The parts of the pause of the run's successful update."""
    s1, s2 = harness.stage(result, 1), harness.stage(result, 2)
    a1 = Anchor.load(s1.path / "anchor-update.json")
    a2 = Anchor.load(s2.path / "anchor-boot.json")
    events = timeline(s2.step("timeline").out)
    boot1 = [e for e in events if e["boot_id"] == a1.boot_id]
    boot2 = [e for e in events if e["boot_id"] == a2.boot_id]

    def h1(name: str) -> float:
        return a1.host_time(float(last(boot1, name)["monotonic"]))

    def h2(name: str, **match: Any) -> float:
        return a2.host_time(float(last(boot2, name, **match)["monotonic"]))

    saved_ram = last(boot1, "ram-saved")
    acked = last(boot1, "freeze-acked")
    retrieved_ram = last(boot2, "ram-retrieved")
    kernel_start = a2.host_time(0.0)
    barrier = a1.host_time(_journal_event(s1_or_prev(s2), "barrier-passed"))
    units = s2.step("units")
    luod_ready = a2.host_time(_unit_usec(units, "luod.service", "ActiveEnterTimestampMonotonic"))
    vmm_spawned = a2.host_time(
        _unit_usec(units, "luod-vmm@demo.service", "ExecMainStartTimestampMonotonic")
    )
    points = [
        ("QMP stop", h1("stopped")),
        ("state saved (cpr-reboot migrate)", h1("saved")),
        ("state memfd handed to luod", h1("state-preserved")),
        ("freeze acknowledged (after a RAM hash)", a1.host_time(float(acked["sent_monotonic"]))),
        ("luod's barrier passed, PID 1 takes the kexec", barrier),
        ("next kernel starts (services stopped, kexec)", kernel_start),
        ("luod READY (boot, luod's reclaim)", luod_ready),
        ("luod-vmm started by PID 1", vmm_spawned),
        ("luod-vmm subscribed: resumed", h2("resumed")),
        ("RAM and state back from luod", h2("fds-retrieved")),
        ("QEMU spawned -incoming (after a RAM hash)", h2("qemu-spawn", incoming=True)),
        ("QMP ready", h2("qmp-ready")),
        ("state loaded (migrate-incoming)", h2("restored")),
        ("running (cont)", h2("running", how="restored")),
    ]
    parts = [(name, t - points[i - 1][1]) for i, (name, t) in enumerate(points) if i > 0]
    start = points[0][1]
    end = points[-1][1]
    hashing = float(saved_ram.get("hash_seconds", 0.0)) + float(
        retrieved_ram.get("hash_seconds", 0.0)
    )
    freeze = h1("freeze")
    saved = last(boot1, "saved")
    restored = last(boot2, "restored")
    details = {
        "freeze event -> QMP stop": start - freeze,
        "QMP stop -> saved": h1("saved") - start,
        "RAM hash on save": float(saved_ram.get("hash_seconds", 0.0)),
        "RAM hash on resume": float(retrieved_ram.get("hash_seconds", 0.0)),
        "kernel start -> luod READY": luod_ready - kernel_start,
        "freeze acknowledged -> next kernel": kernel_start
        - a1.host_time(float(acked["sent_monotonic"])),
        "QEMU spawn -> running": end - h2("qemu-spawn", incoming=True),
    }
    facts: dict[str, Any] = {
        "state_bytes": saved.get("state_bytes"),
        "qemu_downtime_ms": saved.get("downtime_ms"),
        "qemu_total_ms": saved.get("total_ms"),
        "ram_sha256_saved": saved_ram.get("ram_sha256"),
        "ram_sha256_retrieved": retrieved_ram.get("ram_sha256"),
        "counter_saved": saved_ram.get("peek_0x9000"),
        "counter_retrieved": retrieved_ram.get("peek_0x9000"),
        "migration_incoming": restored.get("migration"),
    }
    return Pause(parts, end - start, end - freeze, hashing, details, facts)


def s1_or_prev(s2: harness.Stage) -> harness.Step:
    """luod's journal of the boot before (stage 2's `journalctl -b -1`)."""
    return s2.step("journal-prev-luod-json")


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _counters(peek: dict[str, Any]) -> list[int]:
    return [int(s["counter"]) for s in peek["samples"]]


def _sessions(peek: dict[str, Any]) -> dict[str, list[str]]:
    return {s["name"]: [f["name"] for f in s["files"]] for s in peek["sessions"]}


def _guest_runs(peek: dict[str, Any], after: int | None = None) -> None:
    """The guest counts on (and has not booted again), its pattern intact,
    QEMU says running."""
    counters = _counters(peek)
    assert all(s["magic_ok"] and s["pattern_done"] == 1 for s in peek["samples"]), peek
    assert counters == sorted(counters) and counters[-1] > counters[0], peek
    if after is not None:
        assert counters[0] >= after, (after, peek)
    assert peek["pattern_ok"], peek
    assert peek["qemu"]["status"] == "running", peek


def verify(result: harness.GuestResult) -> dict[str, Any]:
    """Every check of the scenario (AssertionError with the logs if one
    fails); returns what a person wants to see of it."""
    report = result.report()
    s1 = harness.stage(result, 1)
    for name in ("install", "start", "peek-before", "load"):
        step = s1.step(name)
        assert step.ok(), f"{step}\n{s1.text('journal.txt')[-6000:]}\n{report}"
    before = _json(s1.path / "peek-before.json")
    _guest_runs(before)
    held = _sessions(before)
    assert held.get("demo.ram") == ["ram"] and "demo.state" not in held, held

    # The update during which the VMM could not save: aborted, nothing lost,
    # the guest runs on from where it was.
    hung = s1.step("update-hung")
    assert not hung.ok(), f"the update went on although the VMM could not save:\n{hung}"
    assert "could not save the VM" in hung.err + hung.out, hung
    hang = _json(s1.path / "hang.json")
    assert "demo: refused freeze: could not save the VM" in hang["aborted_reason"], hang
    step = s1.step("peek-after-abort")
    assert step.ok(), f"{step}\n{s1.text('journal.txt')[-6000:]}\n{report}"
    after_abort = _json(s1.path / "peek-after-abort.json")
    _guest_runs(after_abort, after=_counters(before)[-1])
    held = _sessions(after_abort)
    assert held.get("demo.ram") == ["ram"] and "demo.state" not in held, held
    last_update = after_abort["luod"]["lastUpdate"]
    assert not last_update["ok"] and last_update["subscriber"] == "demo", last_update

    # The live update: luoctl update -> prepare -> freeze -> kexec -> resumed.
    harness.assert_kexec_reached(result, 1)
    result.check(final_stage=2)
    s2 = harness.stage(result, 2)
    step = s2.step("peek-after")
    assert step.ok(), f"{step}\n{s2.step('journal-vmm').out}\n{report}"
    after = _json(s2.path / "peek-after.json")
    # QEMU runs after -incoming; the guest continues from its count at the
    # freeze (a new boot of the guest would start at 0) and counts on; the
    # pattern it wrote before the kexec is what QEMU sees now.
    events = timeline(s2.step("timeline").out)
    a1 = Anchor.load(s1.path / "anchor-update.json")
    a2 = Anchor.load(s2.path / "anchor-boot.json")
    assert a1.boot_id != a2.boot_id
    boot2 = [e for e in events if e["boot_id"] == a2.boot_id]
    assert [e["event"] for e in boot2][:2] == ["vmm-start", "resumed"], boot2
    assert last(boot2, "running")["how"] == "restored", boot2
    saved = last([e for e in events if e["boot_id"] == a1.boot_id], "ram-saved")
    retrieved = last(boot2, "ram-retrieved")
    # Guest RAM byte for byte as QEMU left it at the freeze.
    assert saved["ram_sha256"] == retrieved["ram_sha256"], (saved, retrieved)
    frozen = int(saved["peek_0x9000"])
    assert int(retrieved["peek_0x9000"]) == frozen > 0, (saved, retrieved)
    _guest_runs(after, after=frozen)
    assert after["pattern_sha256"] == before["pattern_sha256"]
    held = _sessions(after)
    assert held.get("demo.ram") == ["ram"] and "demo.state" not in held, held
    qemu_status = after["qemu"]

    p = pause(result)
    # The clocks line up (each boot tied to the host's): causal order holds.
    assert all(seconds > -PRECISION for _, seconds in p.parts), p.parts
    assert 0 < p.total < TIMEOUT, p
    return {
        "pause": p,
        "counters_before": _counters(before),
        "aborted": hang["aborted_reason"],
        "update_hung": (hung.err + hung.out).strip(),
        "counters_after_abort": _counters(after_abort),
        "counter_frozen": frozen,
        "counters_after": _counters(after),
        "pattern_sha256": after["pattern_sha256"],
        "ram_sha256": saved["ram_sha256"],
        "qemu_status": qemu_status["status"],
        "update_out": s1.text("kexec.out").strip(),
        "host_kexec": harness.kexec_cycles(result).get(1),
        "boot": s2.boot_seconds(),
    }


def format_pause(
    p: Pause, host_kexec: float | None = None, boot: Mapping[str, float] | None = None
) -> str:
    rows = [(name, f"+{seconds:7.3f} s") for name, seconds in p.parts]
    rows += [
        ("total: the guest stopped -> running again", f" {p.total:7.3f} s"),
        ("   of which RAM hashing (a test's check)", f" {p.hashing:7.3f} s"),
        ("   luod's freeze event -> running again", f" {p.freeze_to_running:7.3f} s"),
    ]
    if host_kexec is not None:
        rows.append(("host: luoctl update -> next boot's test stage", f" {host_kexec:7.3f} s"))
    width = max(len(name) for name, _ in rows)
    lines = ["the guest's pause, part by part (host clock, +-0.02 s each):"]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    if boot:
        lines.append(f"  next boot (systemd-analyze): {dict(boot)}")
    f = p.facts
    lines.append(
        f"  state {f['state_bytes']} bytes (QEMU's downtime {f['qemu_downtime_ms']} ms); "
        f"RAM sha256 {str(f['ram_sha256_saved'])[:16]}... saved, "
        f"{str(f['ram_sha256_retrieved'])[:16]}... after the kexec; "
        f"counter {f['counter_saved']} -> {f['counter_retrieved']}"
    )
    return "\n".join(lines)
