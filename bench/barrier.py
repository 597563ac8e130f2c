"""Barrier overhead: an Update with N subscribers that all acknowledge.

Runs on the host against luod on the fake kernel (the barrier is luod's own
logic and varlink traffic; no kernel call sits between freeze sent and
freeze acknowledged). Prints, measured in one run, the prepare and freeze
phases with 0 and with N subscribers and their ratio. The share of the
kexec blackout is that time over the blackout `make bench` measures in the
VM (printed there).

    .venv/bin/python -m bench.barrier [N [BLACKOUT_SECONDS]]
"""

from __future__ import annotations

import sys
import tempfile
import threading
from pathlib import Path

from luod.client import Client
from testsupport.fakekernel import running_fake_kernel
from testsupport.images import GOOD_CMDLINE, fake_bzimage
from testsupport.luodproc import LuodProcess, fake_backend_args


def _subscriber(
    socket_path: str, name: str, ready: threading.Barrier, over: threading.Event
) -> None:
    with Client(socket_path) as events, Client(socket_path) as acks:
        for ev in events.subscribe(name, 30):
            if ev["phase"] == "subscribed":
                ready.wait()
            elif ev["phase"] in ("prepare", "freeze"):
                acks.acknowledge(ev["subscription"], ev["update"], ev["phase"])
                if ev["phase"] == "freeze":
                    # Connected until the update is over, as a real
                    # subscriber is: one that leaves while others still
                    # freeze makes luod abort ("disconnected during freeze").
                    over.wait(60)
                    return


def _update(workdir: Path, fake: str, n: int) -> tuple[float, float]:
    luod = LuodProcess(workdir, fake_backend_args(fake), [])
    luod.start()
    try:
        ready = threading.Barrier(n + 1)
        over = threading.Event()
        threads = []
        for i in range(n):
            t = threading.Thread(
                target=_subscriber,
                args=(luod.socket, f"s{i}", ready, over),
                daemon=True,
            )
            t.start()
            threads.append(t)
        if n:
            ready.wait(60)
        with luod.client() as c:
            c.load_kernel(str(fake_bzimage(workdir / "bzImage")), cmdline=GOOD_CMDLINE)
            out = c.update()
        over.set()
        for t in threads:
            t.join(30)
        luod.wait_exit(30)
        return out["prepareUSec"] / 1e6, out["freezeUSec"] / 1e6
    finally:
        luod.stop()


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    with tempfile.TemporaryDirectory(prefix="luod-bench-") as d:
        workdir = Path(d)
        with running_fake_kernel(workdir) as fake:
            (workdir / "0").mkdir()
            (workdir / "n").mkdir()
            base = _update(workdir / "0", fake, 0)
            many = _update(workdir / "n", fake, n)
    print(
        f"barrier, 0 subscribers:  prepare {base[0] * 1000:7.2f} ms  freeze {base[1] * 1000:7.2f} ms"
    )
    print(
        f"barrier, {n} subscribers: prepare {many[0] * 1000:7.2f} ms  freeze {many[1] * 1000:7.2f} ms"
    )
    total = sum(many)
    print(
        f"freeze sent -> all {n} acknowledged: {many[1] * 1000:.1f} ms "
        f"({many[1] / n * 1e6:.0f} us per subscriber); prepare + freeze: {total * 1000:.1f} ms"
    )
    if len(sys.argv) > 2:
        blackout = float(sys.argv[2])
        print(f"against a blackout of {blackout:g} s (make demo): {total / blackout:.2%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
