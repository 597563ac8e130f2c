"""Bad parameters the hostile tier found (or the issue listed) that used to
end in InternalServerError, a hang or a success: each is now a named error
that names the parameter and changes nothing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from luod import errors, names
from luod.client import Client, VarlinkError
from luod.interfaces import CUSTODY, MANAGER
from tests.hostile.sender import NOBODY
from testsupport.images import fake_bzimage
from testsupport.luodproc import LuodProcess
from testsupport.util import make_memfd, run_as, wait_until

SURROGATE = "\ud800"


def _error(c: Client, method: str, params: dict[str, Any], fds: list[int] | None = None) -> Any:
    with pytest.raises(VarlinkError) as e:
        c.call(method, params, fds or []).close()
    return e.value


def test_check_session_name_refuses_a_lone_surrogate() -> None:
    for name in (SURROGATE, "a" + SURROGATE, SURROGATE * 100):
        with pytest.raises(errors.InvalidName) as e:
            names.check_session_name(name)
        assert e.value.parameter == "session"


@pytest.mark.parametrize(
    ("method", "params", "parameter"),
    [
        ("CreateSession", {"session": SURROGATE}, "session"),
        ("CreateDelegatedSession", {"session": "x" + SURROGATE}, "session"),
        (
            "PreserveFd",
            {"session": SURROGATE, "name": "n", "fileDescriptor": 0, "createSession": True},
            "session",
        ),
        (
            "PreserveFd",
            {"session": "s", "name": SURROGATE, "fileDescriptor": 0, "createSession": True},
            "name",
        ),
        (
            "PreserveFds",
            {
                "session": SURROGATE * 4096,
                "files": [{"name": "n", "fileDescriptor": 0}],
                "createSession": True,
            },
            "session",
        ),
    ],
)
def test_lone_surrogate_in_a_name_is_invalid_name(
    luod: LuodProcess, method: str, params: dict[str, Any], parameter: str
) -> None:
    """It was InternalServerError (UnicodeEncodeError measuring the name)."""
    fd = make_memfd(b"x")
    with luod.client() as c:
        e = _error(c, f"{CUSTODY}.{method}", params, [fd])
        assert (e.error, e.parameters["parameter"]) == (f"{CUSTODY}.InvalidName", parameter)
        assert c.list_sessions() == []
    os.close(fd)
    assert "Traceback" not in luod.log()


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ListSessions", {"session": SURROGATE}),
        ("DiscardSession", {"session": SURROGATE}),
        ("RetrieveSession", {"session": SURROGATE}),
        ("RetrieveFd", {"session": SURROGATE, "name": SURROGATE}),
    ],
)
def test_lone_surrogate_names_no_session(
    luod: LuodProcess, method: str, params: dict[str, Any]
) -> None:
    """A lookup does not judge the name: no session has it."""
    with luod.client() as c:
        e = _error(c, f"{CUSTODY}.{method}", params)
        assert (e.error, e.parameters) == (f"{CUSTODY}.NoSuchSession", {"session": SURROGATE})
    assert "Traceback" not in luod.log()


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"kernel": "\0"}, "kernel"),
        ({"kernel": "/boot/vmlinuz\0.efi"}, "kernel"),
        ({"kernel": SURROGATE}, "kernel"),
        ({"kernel": "IMAGE", "initrd": "\0"}, "initrd"),
        ({"kernel": "IMAGE", "initrd": "/x" + SURROGATE}, "initrd"),
        ({"kernel": "IMAGE", "commandLine": "quiet\0init=/bin/sh"}, "commandLine"),
        ({"kernel": "IMAGE", "commandLine": SURROGATE}, "commandLine"),
    ],
)
def test_load_kernel_refuses_nul_and_surrogates(
    luod: LuodProcess, workdir: Path, params: dict[str, Any], parameter: str
) -> None:
    """NUL in the kernel path was InternalServerError; NUL in the command
    line was loaded, cut short where the kernel reads it as a C string."""
    image = str(fake_bzimage(workdir / "bzImage"))
    params = {k: image if v == "IMAGE" else v for k, v in params.items()}
    with luod.client() as c:
        e = _error(c, f"{MANAGER}.LoadKernel", params)
        assert (e.error, e.parameters["parameter"]) == (f"{MANAGER}.KernelUnusable", parameter)
        assert c.status()["kernelLoaded"] is False
    assert "Traceback" not in luod.log()


def test_load_kernel_from_a_fifo_does_not_hang_luod(luod: LuodProcess, workdir: Path) -> None:
    """open() of a FIFO waits for a writer: luod answered no one again."""
    fifo = workdir / "fifo"
    os.mkfifo(fifo)
    image = str(fake_bzimage(workdir / "bzImage"))
    with luod.client() as c:
        c.sock.settimeout(10)
        for params, parameter in (
            ({"kernel": str(fifo)}, "kernel"),
            ({"kernel": image, "initrd": str(fifo)}, "initrd"),
        ):
            e = _error(c, f"{MANAGER}.LoadKernel", params)
            assert e.error == f"{MANAGER}.KernelUnusable"
            assert e.parameters == {"parameter": parameter, "reason": f"{fifo}: not a regular file"}
        assert c.status()["kernelLoaded"] is False


def _load_kernel_nul(path: str) -> Any:
    with Client(path) as c:
        try:
            c.call(f"{MANAGER}.LoadKernel", {"kernel": "\0"}).close()
            return "allowed"
        except VarlinkError as e:
            return [e.error, e.parameters]


def test_load_kernel_nul_as_nobody_is_root_required(luod: LuodProcess) -> None:
    got = run_as(NOBODY, lambda: _load_kernel_nul(luod.socket))
    assert got == [f"{MANAGER}.RootRequired", {"method": "LoadKernel"}]


@pytest.mark.parametrize("method", ["PreserveFd", "PreserveFds"])
def test_o_path_fd_of_a_memfd_is_refused(luod: LuodProcess, method: str) -> None:
    """fstat() of an O_PATH fd describes the memfd behind it: it was taken
    for the memfd, and held (the fake kernel does not check; the real one's
    fdget() does not see O_PATH fds)."""
    memfd = make_memfd(b"behind an O_PATH fd")
    opath = os.open(f"/proc/self/fd/{memfd}", os.O_PATH | os.O_CLOEXEC)
    if method == "PreserveFd":
        params: dict[str, Any] = {"session": "s", "name": "f", "fileDescriptor": 0}
        parameter = "fileDescriptor"
    else:
        params = {"session": "s", "files": [{"name": "f", "fileDescriptor": 0}]}
        parameter = "files[0].fileDescriptor"
    before = luod.fd_count()
    with luod.client() as c:
        e = _error(c, f"{CUSTODY}.{method}", params | {"createSession": True}, [opath])
        assert e.error == f"{CUSTODY}.UnsupportedFd"
        assert (e.parameters["parameter"], e.parameters["kind"]) == (parameter, "o-path")
        assert c.list_sessions() == []
    os.close(opath)
    os.close(memfd)
    wait_until(lambda: luod.fd_count() <= before, "luod closed the O_PATH fd")


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("CreateSession", {"session": "a" * (1 << 20)}),
        ("CreateSession", {"session": "\n" * (1 << 20)}),
        (
            "PreserveFd",
            {"session": "s", "name": "b" * (1 << 20), "fileDescriptor": 0, "createSession": True},
        ),
    ],
)
def test_a_refused_long_name_is_not_copied_into_the_log(
    luod: LuodProcess, method: str, params: dict[str, Any]
) -> None:
    """Every refusal is logged with the name refused: a name as long as a
    message made each call write a megabyte to luod's log."""
    fd = make_memfd(b"x")
    before = len(luod.log())
    with luod.client() as c:
        e = _error(c, f"{CUSTODY}.{method}", params, [fd])
        assert e.error == f"{CUSTODY}.InvalidName"
        c.status()
    os.close(fd)
    assert len(luod.log()) - before < 4096


@pytest.mark.parametrize(
    ("method", "params", "parameter"),
    [
        (
            f"{CUSTODY}.PreserveFd",
            {"session": "s", "name": "f", "fileDescriptor": True, "createSession": True},
            "fileDescriptor",
        ),
        (
            f"{CUSTODY}.PreserveFds",
            {
                "session": "s",
                "files": [{"name": "f", "fileDescriptor": True}],
                "createSession": True,
            },
            "files",
        ),
        (f"{CUSTODY}.AdoptSession", {"fileDescriptor": True}, "fileDescriptor"),
        (f"{CUSTODY}.ListSessions", {"owner": False}, "owner"),
        (f"{CUSTODY}.RetrieveFd", {"session": "s", "name": "f", "owner": True}, "owner"),
        (f"{CUSTODY}.DiscardSession", {"session": "s", "owner": True}, "owner"),
        (
            f"{MANAGER}.Acknowledge",
            {"subscription": "x", "update": True, "phase": "prepare"},
            "update",
        ),
    ],
)
def test_a_bool_is_no_number(
    luod: LuodProcess, method: str, params: dict[str, Any], parameter: str
) -> None:
    """JSON's true was taken for 1 (a Python bool is an int): an fd index of
    true named the call's second fd, and PreserveFd held it; owner true
    was uid 1. varlink's bool is no int (sd-json refuses it as one)."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    memfd = make_memfd(b"the second fd")
    with luod.client() as c:
        e = _error(c, method, params, [write_end, memfd])
        assert (e.error, e.parameters) == (
            "org.varlink.service.InvalidParameter",
            {"parameter": parameter},
        )
        assert c.list_sessions() == []
    os.close(memfd)
    os.close(read_end)
    os.close(write_end)


def test_a_bool_is_no_deadline(luod: LuodProcess) -> None:
    """deadlineSec true was a deadline of 1 s."""
    with luod.client() as c, pytest.raises(VarlinkError) as e:
        next(c.call_more(f"{MANAGER}.Subscribe", {"name": "x", "deadlineSec": True}))
    assert (e.value.error, e.value.parameters) == (
        "org.varlink.service.InvalidParameter",
        {"parameter": "deadlineSec"},
    )


@pytest.mark.parametrize(
    "name",
    ["", "a\0b", "x" * (1 << 20), SURROGATE, "a\nb", "\x1b[31mred", "a b", "a/b"],
    ids=["empty", "nul", "1 MiB", "surrogate", "newline", "escape", "space", "slash"],
)
def test_a_subscriber_name_follows_the_naming_rules(luod: LuodProcess, name: str) -> None:
    """Subscribe took any string as its name: empty, with NUL or terminal
    escapes, a megabyte long. Each was logged whole (twice: subscribed,
    unsubscribed), listed in GetStatus and written into the manifest that
    is carried over the kexec: one call of uid 65534 with a 1 MiB name grew
    it from 64 KiB to 8 MiB."""
    with luod.client() as c:
        carrier = c.status()["carrier"]
    before = len(luod.log())

    def subscribe() -> list[Any]:
        with Client(luod.socket) as c:
            try:
                next(c.call_more(f"{MANAGER}.Subscribe", {"name": name}))
                return ["allowed"]
            except VarlinkError as e:
                return [e.error, e.parameters]

    got = run_as(NOBODY, subscribe)
    assert got[0] == f"{MANAGER}.InvalidName"
    assert got[1]["parameter"] == "name"
    with luod.client() as c:
        status = c.status()
    assert status["subscribers"] == []
    assert status["carrier"] == carrier
    assert len(luod.log()) - before < 4096
