"""Scenario (b): a memfd handed to luod with `varlinkctl --push-fd=` only,
`luoctl kexec` (-> systemctl kexec), and after the boot luod-reclaim.service
has run and `varlinkctl --exec ... RetrieveFd` gives the same bytes back
(guest/cycle.sh, whose run test_handback shares)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from testsupport.systemd import harness

pytestmark = pytest.mark.systemd


def _json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def test_memfd_pushed_by_varlinkctl_survives_systemctl_kexec(cycle: harness.GuestResult) -> None:
    result = cycle
    report = result.report()
    s1 = harness.stage(result, 1)

    preserve = s1.step("preserve")
    assert preserve.ok(), f"{preserve}\n{report}"
    before = _json(s1.path / "memfd.json")
    assert preserve.json()["file"]["size"] == before["size"] == 1 << 20
    assert s1.step("check").ok(), s1.step("check")
    harness.assert_kexec_reached(result, 1)

    result.check(final_stage=2)
    s2 = harness.stage(result, 2)
    reclaim = s2.step("reclaim").props()
    assert (reclaim["ActiveState"], reclaim["Result"]) == ("active", "success"), (
        f"{reclaim}\n{s2.step('journal-luod').out}"
    )

    retrieve = s2.step("retrieve")
    assert retrieve.ok(), f"{retrieve}\n{s2.step('journal-luod').out}\n{report}"
    after = _json(s2.path / "retrieved.json")
    assert after["listen_fds"] == "1", after
    assert after["sha256"] == before["sha256"], (before, after)
    assert after["size"] == before["size"]
    assert after["position"] == before["position"] == 4096

    [held] = s2.step("list").json()
    assert [f["name"] for f in held["files"]] == ["blob"], held
    status = json.loads(s2.step("status").out)["status"]
    assert status["files"] == 2, status  # this blob and test_handback's
