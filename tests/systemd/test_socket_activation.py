"""Scenario (a): luod.socket activation, and luod as systemd 262's varlinkctl
sees it, in a VM whose PID 1 is systemd (stage 1 of guest/cycle.sh, before
anything is held)."""

from __future__ import annotations

import json
import re

import pytest

from testsupport.systemd import harness

pytestmark = pytest.mark.systemd

PROTOCOL = harness.REPO / "protocol"


def _idl_methods() -> set[str]:
    methods = set()
    for idl in PROTOCOL.glob("*.varlink"):
        text = idl.read_text()
        iface = re.search(r"^interface\s+(\S+)", text, re.M)
        assert iface, idl
        methods |= {f"{iface.group(1)}.{m}" for m in re.findall(r"^method\s+(\w+)", text, re.M)}
    return methods


def test_socket_activation_and_varlinkctl(cycle: harness.GuestResult) -> None:
    report = cycle.report()
    assert 1 in cycle.stage_uptime, report
    s = harness.stage(cycle, 1)

    socket = s.step("boot-socket").props()
    assert socket["ActiveState"] == "active", report
    assert socket["Listen"].startswith("/run/luod/io.luod"), socket
    assert s.step("enabled").out.split() == ["enabled", "enabled"], s.step("enabled")
    assert s.step("socket-node").out.split() == ["socket", "666", "root"]
    reclaim = s.step("boot-reclaim").props()
    assert (reclaim["ActiveState"], reclaim["Result"]) == ("active", "success"), reclaim

    # luod stopped: the socket keeps listening, and the first call starts luod.
    assert s.step("stop-luod").ok(), s.step("stop-luod")
    stopped = s.step("stopped-luod").props()
    assert stopped["ActiveState"] == "inactive", stopped
    assert s.step("stopped-socket").props()["SubState"] == "listening"
    first = s.step("first-call")
    assert first.ok(), first
    status = first.json()["status"]
    assert status["backend"] == "kernel", status
    started = s.step("started-luod").props()
    assert started["ActiveState"] == "active", started
    assert started["TriggeredBy"] == "luod.socket"
    assert started["InvocationID"] != stopped["InvocationID"]

    info = s.step("info")
    assert info.ok(), info
    assert re.search(r"Product:\s+luod", info.out), info
    interfaces = s.step("list-interfaces").out.split()
    assert {"io.luod.Custody", "io.luod.Manager"} <= set(interfaces), interfaces

    for iface in ("Custody", "Manager"):
        intro = s.step(f"introspect-{iface.lower()}")
        assert intro.ok(), intro
        assert f"interface io.luod.{iface}" in intro.out, intro
        served = set(re.findall(r"^method\s+(\w+)", intro.out, re.M))
        idl = set(
            re.findall(
                r"^method\s+(\w+)", (PROTOCOL / f"io.luod.{iface}.varlink").read_text(), re.M
            )
        )
        assert served == idl

    methods = set(s.step("list-methods").out.split())
    assert _idl_methods() <= methods, methods

    registry = s.step("list-registry").out
    for iface in ("io.luod.Custody", "io.luod.Manager"):
        assert re.search(rf"^{re.escape(iface)}\s+unix:/run/luod/io.luod$", registry, re.M), (
            registry
        )

    # varlinkctl list-sockets asks sock_diag (CONFIG_UNIX_DIAG, in
    # vm/kernel/systemd.config) for listening AF_UNIX sockets.
    sockets = s.step("list-sockets")
    assert sockets.ok() and "/run/luod/io.luod" in sockets.out, sockets

    err = s.step("no-such-session")
    assert not err.ok() and "io.luod.Custody.NoSuchSession" in err.err, err

    luoctl = json.loads(s.step("luoctl-status").out)
    assert luoctl["check"]["ready"] is True, luoctl
    # luod asked PID 1 (io.systemd.Manager GetInfo) and trusts it to carry
    # the fd store over a kexec.
    journal = s.step("journal-luod").out
    assert re.search(r'event=service-manager-carries-fdstore version="?26[2-9]', journal), journal
    assert "NOT carried" not in luoctl["status"]["carrier"], luoctl
