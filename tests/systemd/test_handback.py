"""Service fd-store hand-back (issue 4): a demo service whose memfd went
through luod finds it in its own fd store (LISTEN_FDNAMES) when it starts
after a real `luoctl kexec`, without calling luod itself.

luod-test-handback.service (tests/systemd/units/) has NotifyAccess=all,
FileDescriptorStoreMax=4 and `ExecStartPre=luoctl handback handback
--optional`: PID 1 takes FDSTORE=1 messages from the control process and
passes the store to ExecStart= (src/core/service.c: service_notify_message,
service_exec_flags gives EXEC_PASS_FDS to ExecStart= only, service_collect_fds
adds the fd store). One QEMU run: boot, one kexec, boot (guest/cycle.sh, whose
run test_handoff shares)."""

from __future__ import annotations

from typing import Any

import pytest

from testsupport.systemd import harness

pytestmark = pytest.mark.systemd


def _unit_json(stage: harness.Stage) -> dict[str, Any]:
    step = stage.step("handback-json")
    assert step.ok(), f"{step}\n{stage.step('handback-journal-unit').out}"
    data: dict[str, Any] = step.json()
    return data


def test_service_finds_its_memfd_in_its_fd_store_after_kexec(cycle: harness.GuestResult) -> None:
    result = cycle
    report = result.report()
    s1 = harness.stage(result, 1)

    # Boot 1: no session yet; --optional lets the unit start, the program
    # hands its memfd to luod.
    start = s1.step("handback-start")
    assert start.ok(), f"{start}\n{s1.step('handback-journal-unit').out}\n{report}"
    first = _unit_json(s1)
    assert first["ok"] and first["mode"] == "pushed-to-luod", first
    assert first["listen_fds"] is None, first
    assert "nothing to hand back (--optional)" in s1.step("handback-journal-unit").out
    [held] = s1.step("handback-list").json()
    assert [f["name"] for f in held["files"]] == ["blob"], held
    assert held["owner"].get("unit") == "luod-test-handback.service", held
    assert s1.step("handback-enable").ok(), s1.step("handback-enable")

    harness.assert_kexec_reached(result, 1)
    result.check(final_stage=2)
    s2 = harness.stage(result, 2)

    # Boot 2: started at boot after luod-reclaim.service; the fd came from
    # the unit's own fd store, named as in luod, with the same bytes.
    shown = s2.step("handback-show").props()
    journal = s2.step("handback-journal-unit").out
    assert (shown["ActiveState"], shown["Result"]) == ("active", "success"), (
        f"{shown}\n{journal}\n{s2.step('journal-luod').out}"
    )
    second = _unit_json(s2)
    assert second["ok"] and second["mode"] == "from-store", f"{second}\n{journal}"
    assert second["listen_fdnames"] == "blob" and second["listen_fds"] == "1", second
    was, now = first["memfd"], second["memfd"]
    assert (now["sha256"], now["size"]) == (was["sha256"], was["size"]), (was, now)
    assert now["position"] == was["position"], (was, now)
    # (The /proc link of a memfd retrieved after a kexec is "/ (deleted)":
    # the kernel does not carry its name.)
    assert "handed 1 fds of session 'handback' to the fd store" in journal, journal

    reclaim = s2.step("reclaim").props()
    assert int(reclaim["ExecMainExitTimestampMonotonic"]) <= int(
        shown["ExecMainStartTimestampMonotonic"]
    ), (reclaim, shown)

    # The store holds it (systemd-analyze fdstore), and luod still does
    # (a copy was handed back).
    store = s2.step("handback-fdstore")
    assert store.ok() and "blob" in store.out, store
    assert shown["NFileDescriptorStore"] == "1", shown
    [held2] = s2.step("handback-list").json()
    assert [f["name"] for f in held2["files"]] == ["blob"], held2

    # The service's main process did not call luod: luod copied the fd to
    # the ExecStartPre= helper (luoctl) and to no one else.
    copies = [
        e
        for e in s2.step("journal-luod-json").journal()
        if e.get("LUOD_EVENT") in ("fd-copied", "fd-taken", "fds-copied", "fds-taken")
        and e.get("LUOD_SESSION") == "handback"
    ]
    assert len(copies) == 1, copies
    print(
        f"handback: {now['size']} bytes, sha256 {now['sha256'][:16]}..., "
        f"copied to {copies[0].get('LUOD_TO') or copies[0].get('MESSAGE')}"
    )
