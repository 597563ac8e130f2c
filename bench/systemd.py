"""luod vs a service's own fd store, under systemd 262 as PID 1, in one VM run.

    .venv/bin/python -m bench.systemd [--count 1000] [--results DIR]

Boots the systemd tier's image (vm/build-root.sh, vm/build-image.sh, the
project's LUO kernel) under QEMU/TCG, and in one transient service with
FileDescriptorStoreMax= (bench/systemd-stage.sh, testsupport/systemd/guest/bulk.py)
pushes the same N memfds of one page each

- into luod: PreserveFds batches over varlink (luod preserves every memfd
  in the kernel at once, so errors show at hand-off time);
- into the service's own fd store: sd_notify FDSTORE=1, up to 253 fds per
  message, until PID 1 answers a BARRIER=1 (PID 1 only keeps the fds; it
  preserves them in the kernel at shutdown, for a kexec);

and prints both times and their ratio, measured in that one run. No
assertion on time: the exit status is non-zero only when the benchmark could
not run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from testsupport.systemd import harness
from testsupport.vm import qemu

STAGE = Path(__file__).with_name("systemd-stage.sh")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.systemd", description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=1000, help="memfds pushed each way (default 1000)")
    p.add_argument("--results", type=Path, help="results folder (default: a new one in /tmp)")
    p.add_argument("--kernel", type=Path, help="bzImage (default: vm/build-kernel.sh stock)")
    p.add_argument("--image", type=Path, help="a disk image of vm/build-image.sh to reuse")
    p.add_argument("--timeout", type=float, default=900.0)
    args = p.parse_args(argv)

    reason = qemu.qemu_unavailable_reason()
    if reason is not None:
        print(f"bench: cannot run: {reason}", file=sys.stderr)
        return 2
    results = args.results or Path(tempfile.mkdtemp(prefix="luod-bench-systemd-"))
    results.mkdir(parents=True, exist_ok=True)
    kernel = args.kernel or qemu.build_kernel("stock")
    image = args.image
    if image is None:
        t = time.monotonic()
        image = harness.build_image(results / "root.img", kernel, harness.build_root())
        print(f"image built in {time.monotonic() - t:.1f}s")
    count_file = results / "bench-count"
    count_file.write_text(f"{args.count}\n")
    result = harness.boot(
        image, kernel, STAGE, results / "vm", args.timeout, extra_files=[count_file]
    )
    print(harness.describe(result))
    stage = harness.stage(result, 1)
    try:
        compare = stage.step("compare")
        data: dict[str, Any] = json.loads((stage.path / "bench.json").read_text())
    except (harness.GuestError, OSError, ValueError) as e:
        print(f"bench: the run FAILED ({e}); results in {results}\n{result.report()}")
        return 1
    if not compare.ok():
        print(f"bench: the run FAILED:\n{compare}\nresults in {results}")
        return 1
    luod, store = data["luod"], data["fdstore"]
    n = data["count"]
    print(
        f"\n{n} memfds of 4 KiB, one run, systemd 262 as PID 1, TCG "
        f"(boot: {stage.boot_seconds()})\n"
        f"  luod (PreserveFds, {luod['batches']} calls):        {luod['seconds']:.3f} s "
        f"({luod['seconds'] / n * 1e6:.0f} us/fd)\n"
        f"  fd store (FDSTORE=1, {store['messages']} messages + BARRIER=1): {store['seconds']:.3f} s "
        f"({store['seconds'] / n * 1e6:.0f} us/fd; sending {store['send_seconds']:.3f} s)\n"
        f"  ratio luod / fd store: {data['ratio']:.1f}x\n"
        f"results in {results}"
    )
    (results / "bench-systemd.json").write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
