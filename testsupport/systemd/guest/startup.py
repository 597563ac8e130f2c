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

Writes every sample and both medians to FILE (JSON).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from typing import Any

from testsupport.guest import write_json

PROPS = "ExecMainStartTimestampMonotonic,ActiveEnterTimestampMonotonic,ExecMainPID"


def show(unit: str) -> dict[str, str]:
    text = subprocess.run(
        ["systemctl", "show", "-p", PROPS, unit], check=True, capture_output=True, text=True
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


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--info", required=True)
    p.add_argument("--restarts", type=int, default=5)
    args = p.parse_args()
    # One import first, so that neither side pays for a cold page cache alone
    # (luod has been running: its files are cached).
    import_asyncio()
    restarts: list[dict[str, Any]] = []
    imports: list[float] = []
    for _ in range(args.restarts):
        restarts.append(luod_restart())
        imports.append(import_asyncio())
    out = {
        "luod_restarts": restarts,
        "luod_ready_median": statistics.median(r["seconds"] for r in restarts),
        "import_asyncio": imports,
        "import_asyncio_median": statistics.median(imports),
    }
    write_json(args.info, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
