"""Issue 11 on the real kernel, without systemd (guest side:
guest_crashsafety.py): luod killed with SIGKILL at the reclaim and at every
re-preserve step after a real kexec, under a fake PID 1 that keeps luod's
fd store on /dev/liveupdate; nothing acknowledged is lost, every file is
retrievable right after READY, and the next kexec carries all of it. And
under the state-session carrier: what a crash costs is said before it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from testsupport.vm import qemu

from .guest_crashsafety import CRASH_STEPS, SESSIONS, SIZES

pytestmark = pytest.mark.vm

GUEST = Path(__file__).with_name("guest_crashsafety.py")
STAGES = 3
TIMEOUT = 600.0


def run(kernel: Path, results: Path) -> list[dict[str, Any]]:
    result = qemu.run_guest(
        kernel, GUEST, results, TIMEOUT, guest_env={"LUOD_VM_SCENARIO": "crash"}, memory="1G"
    )
    out = []
    for n in range(1, STAGES + 1):
        path = results / f"luod-crash-{n}.json"
        assert path.exists(), f"stage {n} wrote nothing\n{result.report()}"
        data: dict[str, Any] = result.read_json(path.name)
        assert "error" not in data, (
            f"stage {n}: {data.get('traceback')}\n{data.get('luod_logs', '')}\n"
            f"{data.get('log', '')}\n{result.report()}"
        )
        out.append(data)
    result.check(final_stage=STAGES)
    return out


def store_layout(names: list[str]) -> tuple[list[str], list[str]]:
    """The kernel names of the sessions in luod's fd store, and of those
    whose file references are parked there (refs.<kernel name>, see
    luod.carriers.parking); asserts that nothing else is in it but luod's
    own (manifest, journal)."""
    sessions = sorted(n.removeprefix("session.") for n in names if n.startswith("session."))
    refs = sorted({n.removeprefix("refs.") for n in names if n.startswith("refs.")})
    rest = [n for n in names if not n.startswith(("session.", "refs."))]
    assert rest and all(n.startswith("luod-") for n in rest), names
    return sessions, refs


def test_kill9_at_reclaim_and_represerve_loses_nothing(tmp_path: Path, stock_kernel: Path) -> None:
    s1, s2, s3 = run(stock_kernel, tmp_path / "results")
    files = s1["files"]
    assert len(files) == SESSIONS * len(SIZES)
    expected_sessions = {f"cs{s}": [f"f{i}" for i in range(len(SIZES))] for s in range(SESSIONS)}

    # Without a service manager: luod's exit releases what it holds, and
    # luod said so before the crash.
    plain = s1["state_session"]
    assert plain["status_before"]["files"] == 2
    cost = plain["status_before"]["crashCost"]
    assert "(state-session carrier)" in cost["reason"], cost
    assert (cost["everything"], cost["sessions"], cost["files"]) == (True, 1, 2), cost
    assert plain["check_before"]["crashCost"] == cost
    said = plain["luoctl_status_before"]
    assert said["rc"] == 0, said
    assert "a luod crash now would release 1 session, 2 files" in said["stdout"], said
    assert plain["kill_rc"] == -9
    assert list(plain["kernel_after"].values()) == ["released"], plain

    # With the fd store (the fake PID 1 on the real kernel).
    assert s1["status"]["carrier"].startswith("fd store: "), s1["status"]
    assert s1["sessions"] == expected_sessions
    cost = s1["status"]["crashCost"]
    assert (cost["everything"], cost["sessions"], cost["files"]) == (False, 0, 0), cost

    # Stage 2: one kill -9 at each step, each one landed.
    log2 = s2["log"]
    assert [c["step"] for c in s2["crashes"]] == list(CRASH_STEPS)
    for crash in s2["crashes"]:
        assert crash["killed"], f"{crash}\n{log2}"
    # Right after READY, with no step between: every file, byte for byte.
    assert s2["retrieved"] == files, log2
    rec = s2["status"]["reclaim"]
    assert rec["lost"] == [], f"{rec}\n{log2}"
    assert s2["status"]["files"] == len(files)
    assert s2["sessions"] == expected_sessions
    assert s2["status_preserved_again"]["reclaim"]["preservedAgainUSec"] is not None, log2
    assert s2["check"]["ready"] is True, s2["check"]
    # The store holds luod's sessions (by kernel name), the references to
    # their files, its manifest and journal: nothing left of the incoming
    # sessions, nor of the outgoing one the kill at again.represerved left.
    held = s2["kernel_names"]
    assert store_layout(s2["store"]) == (held, held), s2["store"]

    # Stage 3: the next kexec carried all of it.
    log3 = s3["log"]
    assert s3["retrieved"] == files, log3
    rec = s3["status"]["reclaim"]
    assert (rec["state"], rec["files"], rec["lost"]) == ("reclaimed", len(files), []), log3
    assert s3["sessions"] == expected_sessions
    # PID 1 brought back exactly what luod held: no session left over.
    # (No parked references: a socket does not survive a kexec.)
    assert store_layout(s3["store_restored"]) == (held, []), s3["store_restored"]
    assert store_layout(s3["store"]) == (s3["kernel_names"], s3["kernel_names"]), s3["store"]
