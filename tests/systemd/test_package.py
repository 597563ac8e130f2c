"""luod's Debian package under systemd 262 (make deb; every image of this
tier installs luod from it): what it enables; an upgrade in place while luod
holds a memfd (luod restarts and finds it in its fd store; the memfd comes
back after the kexec, byte for byte); and removal: refused while luod holds
a session; with LUOD_REMOVE_RELEASES=1 luod is stopped and its fd store in
PID 1 closed, so nothing stays preserved for a luod that is gone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import luod
from testsupport.systemd import harness

from .conftest import SCENARIOS, UPGRADE_VERSION, SystemdVM

pytestmark = pytest.mark.systemd

GUEST = SCENARIOS / "package.sh"
# Two boots of ~40 s and one kexec under TCG, dpkg runs: about 250 s
# with three guests on 2 cores (make test).
TIMEOUT = 900.0


def _json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def test_install_upgrade_kexec_remove(systemd_vm: SystemdVM, results: Path) -> None:
    if systemd_vm.upgrade_deb is None:
        pytest.skip("LUOD_SYSTEMD_IMAGE given: no package of this tree to upgrade to")
    result = systemd_vm.boot(GUEST, results, TIMEOUT, extra_files=[systemd_vm.upgrade_deb])
    report = result.report()
    s1 = harness.stage(result, 1)

    assert s1.step("installed").out.split() == [luod.__version__, "ii"], s1.step("installed")
    # luod.socket and luod-reclaim.service enabled; luod.service has no
    # [Install]: its socket starts it.
    assert s1.step("enabled").out.split() == ["enabled", "enabled", "static"], s1.step("enabled")
    assert s1.step("files").ok(), s1.step("files")

    assert s1.step("preserve").ok(), f"{s1.step('preserve')}\n{report}"
    before = s1.step("before-upgrade").props()
    assert before["ActiveState"] == "active", before

    # The upgrade restarts the running luod (try-restart): a new process,
    # which found the session in its fd store.
    assert s1.step("upgrade").ok(), s1.step("upgrade")
    assert s1.step("upgraded").out.split() == [UPGRADE_VERSION, "ii"], s1.step("upgraded")
    after = s1.step("after-upgrade").props()
    assert after["ActiveState"] == "active", after
    assert after["InvocationID"] != before["InvocationID"], (before, after)
    assert "blob" in s1.step("list").out, s1.step("list")
    assert s1.step("check").ok(), s1.step("check")
    harness.assert_kexec_reached(result, 1)

    result.check(final_stage=2)
    s2 = harness.stage(result, 2)
    reclaim = s2.step("reclaim").props()
    assert (reclaim["ActiveState"], reclaim["Result"]) == ("active", "success"), reclaim
    retrieve = s2.step("retrieve")
    assert retrieve.ok(), f"{retrieve}\n{s2.step('journal-luod').out}\n{report}"
    assert _json(s2.path / "retrieved.json")["sha256"] == _json(s1.path / "memfd.json")["sha256"]

    # Removal while luod holds a session: refused, luod and the package stay.
    refused = s2.step("remove-refused")
    assert not refused.ok(), refused
    assert "luod holds 1 session(s)" in refused.err, refused
    version, status = s2.step("refused-state").out.split()
    assert (version, status[1]) == (UPGRADE_VERSION, "i"), s2.step("refused-state")
    assert s2.step("refused-luod").props()["ActiveState"] == "active"

    # Removal that releases: luod stopped, its fd store closed, files gone.
    assert s2.step("remove").ok(), s2.step("remove")
    assert s2.step("removed-state").out.split()[-1] == "rc", s2.step("removed-state")
    gone = s2.step("removed-luod").props()
    assert gone["ActiveState"] == "inactive", gone
    assert gone["NFileDescriptorStore"] == "0", gone
    assert s2.step("removed-files").out.count("No such file") == 3, s2.step("removed-files")
    assert s2.step("purge").ok(), s2.step("purge")
