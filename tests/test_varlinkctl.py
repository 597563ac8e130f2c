"""systemd 262's own varlinkctl against luod: no luod client code involved."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests import sidtools
from testsupport.luodproc import LuodProcess
from testsupport.util import make_memfd

pytestmark = pytest.mark.varlinkctl

PROTOCOL = Path(__file__).resolve().parent.parent / "protocol"


def _varlinkctl(*args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    exe = sidtools.sid_bin_dir_or_skip() / "varlinkctl"
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, timeout=60, pass_fds=pass_fds
    )


def test_validate_idl() -> None:
    for path in sorted(PROTOCOL.glob("*.varlink")):
        r = _varlinkctl("validate-idl", str(path))
        assert r.returncode == 0, (path, r.stderr)


def test_info_and_introspect(luod: LuodProcess) -> None:
    r = _varlinkctl("info", f"unix:{luod.socket}")
    assert r.returncode == 0, r.stderr
    assert "Product: luod" in r.stdout
    for iface in ("io.luod.Custody", "io.luod.Manager", "org.varlink.service"):
        assert iface in r.stdout
    r = _varlinkctl("introspect", luod.socket, "io.luod.Custody")
    assert r.returncode == 0, r.stderr
    assert "method PreserveFd(" in r.stdout
    assert "error UnsupportedFd" in r.stdout
    r = _varlinkctl("list-methods", luod.socket, "io.luod.Manager")
    assert r.stdout.split() == [
        "io.luod.Manager.Acknowledge",
        "io.luod.Manager.Check",
        "io.luod.Manager.GetStatus",
        "io.luod.Manager.KExec",
        "io.luod.Manager.LoadKernel",
        "io.luod.Manager.Reclaim",
        "io.luod.Manager.Subscribe",
        "io.luod.Manager.UnloadKernel",
        "io.luod.Manager.Update",
    ]


def test_call_push_fd_and_exec_retrieve(luod: LuodProcess, workdir: Path) -> None:
    data = os.urandom(70_000)
    fd = make_memfd(data, position=5)
    os.set_inheritable(fd, True)
    params = {"session": "vc", "name": "blob", "fileDescriptor": 0, "createSession": True}
    r = _varlinkctl(
        "call",
        f"--push-fd={fd}",
        luod.socket,
        "io.luod.Custody.PreserveFd",
        json.dumps(params),
        pass_fds=(fd,),
    )
    os.close(fd)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["file"]["size"] == len(data)

    luod.kexec()

    out = workdir / "out.bin"
    r = _varlinkctl(
        "--exec",
        "call",
        luod.socket,
        "io.luod.Custody.RetrieveFd",
        json.dumps({"session": "vc", "name": "blob", "take": True}),
        "--",
        "sh",
        "-c",
        f'test "$LISTEN_FDS" = 1 && cat /proc/self/fdinfo/3 | grep -q "^pos:\\s*5$" && cat <&3 > {out}',
    )
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == data[5:]


def test_exec_retrieve_many(luod: LuodProcess, workdir: Path) -> None:
    """RetrieveFds: the fds come as sd-varlink passes them (indexes into the
    reply's fds), so --exec hands every one on, in the order of the reply."""
    with luod.client() as c:
        for i, name in enumerate(("x", "y", "z")):
            fd = make_memfd(f"file {name}".encode())
            c.preserve_fd("many", name, fd, create_session=i == 0)
            os.close(fd)
    luod.kexec()
    out = workdir / "out.txt"
    r = _varlinkctl(
        "--exec",
        "call",
        luod.socket,
        "io.luod.Custody.RetrieveFds",
        json.dumps({"session": "many", "names": ["z", "x"], "take": True}),
        "--",
        "sh",
        "-c",
        f'test "$LISTEN_FDS" = 2 && {{ cat <&3; echo; cat <&4; echo; cat; }} > {out}',
    )
    assert r.returncode == 0, r.stderr
    first, second, reply = out.read_text().split("\n", 2)
    assert (first, second) == ("file z", "file x")
    files = json.loads(reply)["files"]
    assert [(f["fileDescriptor"], f["file"]["name"]) for f in files] == [(0, "z"), (1, "x")]
    with luod.client() as c:
        assert [f["name"] for f in c.list_sessions("many")[0]["files"]] == ["y"]


def test_call_errors_are_named(luod: LuodProcess) -> None:
    r = _varlinkctl(
        "call", luod.socket, "io.luod.Custody.RetrieveFd", '{"session":"nope","name":"x"}'
    )
    assert r.returncode != 0
    assert "io.luod.Custody.NoSuchSession" in r.stderr
    r = _varlinkctl("call", luod.socket, "io.luod.Manager.GetStatus", "{}")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"]["backend"] == "fake"
