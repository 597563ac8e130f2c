#!/usr/bin/python3
"""Guest helper of bench/systemd.py (issue 12, goal 2): luod's start to
READY against a bare interpreter's `import asyncio`, in the same guest.

    startup.py --info FILE [--restarts 5]

- `systemctl restart luod.service`, `restarts` times: each time luod.service's
  ExecMainStartTimestampMonotonic -> ActiveEnterTimestampMonotonic (Type=notify:
  ActiveEnter is READY=1), from PID 1's own clock readings.
- `python3 -c "import asyncio"` right after each restart: wall time around
  fork/exec and wait (subprocess.run), CLOCK_MONOTONIC. A restart and its run
  side by side, so that a burst of load on the shared host lands on both.
- the same `python3 -c "import asyncio"` as a service started by PID 1, twice
  after each restart: once plain (Type=oneshot, nothing else), once with
  every line of luod.service's [Service] section that sets how luod runs
  (its sandbox, limits, umask), not what it runs. Each from PID 1's own
  clock readings, ExecMainStartTimestampMonotonic ->
  ExecMainExitTimestampMonotonic, as luod's figure is: what PID 1 and the
  sandbox cost any program, so that luod's start is compared like with like.

Writes every sample, the medians and the sandbox lines to FILE (JSON).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from typing import Any

from testsupport.guest import write_json

PROPS = "ExecMainStartTimestampMonotonic,ActiveEnterTimestampMonotonic,ExecMainPID"
EXIT_PROPS = "ExecMainStartTimestampMonotonic,ExecMainExitTimestampMonotonic,ExecMainStatus"
BASELINE = 'ExecStart=/usr/bin/python3 -c "import asyncio"'
# The two baseline services (in /run: gone with the boot).
UNITS = {"plain": "luod-bench-asyncio.service", "sandboxed": "luod-bench-asyncio-sandboxed.service"}
# Lines of luod.service's [Service] section that say what luod is and how
# PID 1 talks to it, not how it runs: left out of the sandboxed baseline.
# RuntimeDirectory= too: /run/luod is luod's (and its socket's).
NOT_SANDBOX = re.compile(
    r"^(Type|ExecStart|ExecStartPre|ExecStartPost|ExecReload|ExecStop|NotifyAccess|Restart"
    r"|RestartSec|FileDescriptorStore\w*|RuntimeDirectory\w*|Sockets|TimeoutStartSec)="
)


def show(unit: str, props: str = PROPS) -> dict[str, str]:
    text = subprocess.run(
        ["systemctl", "show", "-p", props, unit], check=True, capture_output=True, text=True
    ).stdout
    pairs = (line.partition("=") for line in text.splitlines())
    return {k: v for k, _, v in pairs}


def luod_restart() -> dict[str, Any]:
    subprocess.run(["systemctl", "restart", "luod.service"], check=True)
    p = show("luod.service")
    start, ready = (
        int(p["ExecMainStartTimestampMonotonic"]),
        int(p["ActiveEnterTimestampMonotonic"]),
    )
    return {
        "pid": p["ExecMainPID"],
        "start_us": start,
        "ready_us": ready,
        "seconds": (ready - start) / 1e6,
    }


def import_asyncio() -> float:
    t = time.monotonic()
    subprocess.run(["python3", "-c", "import asyncio"], check=True)
    return time.monotonic() - t


def sandbox_lines(unit_text: str) -> list[str]:
    """The lines of the [Service] sections of `unit_text` (`systemctl cat`:
    the unit and its drop-ins, in order) that set how the service runs."""
    lines: list[str] = []
    service = False
    for raw in unit_text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            service = line == "[Service]"
        elif service and line and not line.startswith(("#", ";")) and not NOT_SANDBOX.match(line):
            lines.append(line)
    return lines


def baseline_unit(kind: str, sandbox: list[str]) -> str:
    """The baseline service `kind` ("plain" or "sandboxed": with the lines
    `sandbox`): `python3 -c "import asyncio"`, a oneshot."""
    extra = sandbox if kind == "sandboxed" else []
    return (
        "# Written by startup.py (bench/systemd.py), test VMs only.\n"
        f"[Unit]\nDescription=luod bench: import asyncio, {kind}\n"
        "DefaultDependencies=no\n\n"
        # RemainAfterExit=: an inactive unit nothing refers to is unloaded,
        # and its timestamps with it, before `systemctl show` reads them.
        f"[Service]\nType=oneshot\nRemainAfterExit=yes\n{BASELINE}\n"
        + "".join(f"{x}\n" for x in extra)
    )


def write_baselines(sandbox: list[str]) -> None:
    """Both baseline services, in /run/systemd/system."""
    for kind, unit in UNITS.items():
        with open(f"/run/systemd/system/{unit}", "w") as f:
            f.write(baseline_unit(kind, sandbox))
    subprocess.run(["systemctl", "daemon-reload"], check=True)


def import_asyncio_unit(unit: str) -> float:
    """Start the oneshot baseline `unit` (systemctl returns once it exited);
    PID 1's ExecMainStart -> ExecMainExit. Stopped again after, so that the
    next start runs it."""
    subprocess.run(["systemctl", "start", unit], check=True)
    p = show(unit, EXIT_PROPS)
    subprocess.run(["systemctl", "stop", unit], check=True)
    start, end = (
        int(p.get("ExecMainStartTimestampMonotonic") or 0),
        int(p.get("ExecMainExitTimestampMonotonic") or 0),
    )
    if p.get("ExecMainStatus") != "0" or not 0 < start < end:
        raise RuntimeError(f"{unit}: no clean run of python3 in what PID 1 says: {p}")
    return (end - start) / 1e6


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--info", required=True)
    p.add_argument("--restarts", type=int, default=5)
    args = p.parse_args()
    sandbox = sandbox_lines(
        subprocess.run(
            ["systemctl", "cat", "luod.service"], check=True, capture_output=True, text=True
        ).stdout
    )
    write_baselines(sandbox)
    # One import first, so that neither side pays for a cold page cache alone
    # (luod has been running: its files are cached); each service once too.
    import_asyncio()
    for unit in UNITS.values():
        import_asyncio_unit(unit)
    restarts: list[dict[str, Any]] = []
    imports: list[float] = []
    in_units: dict[str, list[float]] = {kind: [] for kind in UNITS}
    for _ in range(args.restarts):
        restarts.append(luod_restart())
        imports.append(import_asyncio())
        for kind, unit in UNITS.items():
            in_units[kind].append(import_asyncio_unit(unit))
    out = {
        "luod_restarts": restarts,
        "luod_ready_median": statistics.median(r["seconds"] for r in restarts),
        "import_asyncio": imports,
        "import_asyncio_median": statistics.median(imports),
        "import_asyncio_units": in_units,
        "import_asyncio_unit_medians": {k: statistics.median(v) for k, v in in_units.items()},
        "sandbox": sandbox,
    }
    write_json(args.info, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
