"""Unit tests of luod.carriers: choosing and opening a carrier by name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from luod.carriers import CARRIERS, choose_carrier, make_carrier, store_max_from_env
from luod.carriers.fdstore import FdStoreCarrier
from luod.carriers.state_session import StateSessionCarrier
from luod.kernel import fdinfo
from luod.notify import ListenFd
from testsupport.fakekernel import FakeBackend
from testsupport.util import make_memfd

STORE = {"NOTIFY_SOCKET": "/run/systemd/notify", "FDSTORE": "65536"}


def test_every_carrier_is_a_module_named_after_it() -> None:
    assert list(CARRIERS) == ["state-session", "fdstore"]
    assert [m.rsplit(".", 1)[1] for m in CARRIERS.values()] == ["state_session", "fdstore"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("x", None), ("0", None), ("-1", None), ("7", 7)],
)
def test_store_max_from_env(value: str | None, expected: int | None) -> None:
    assert store_max_from_env(value) == expected


def test_choose_carrier() -> None:
    assert choose_carrier("auto", STORE) == (
        "fdstore",
        "the service has an fd store of 65536 entries ($FDSTORE)",
    )
    assert choose_carrier("auto", {"NOTIFY_SOCKET": "/x"})[0] == "state-session"
    assert choose_carrier("auto", {"NOTIFY_SOCKET": "/x", "FDSTORE": "0"})[0] == "state-session"
    assert choose_carrier("auto", {"NOTIFY_SOCKET": "/x", "FDSTORE": "x"})[0] == "state-session"
    assert choose_carrier("auto", {"FDSTORE": "5"}) == (
        "state-session",
        "no service manager ($NOTIFY_SOCKET is not set)",
    )
    assert choose_carrier("state-session", STORE) == ("state-session", "--carrier=state-session")
    assert choose_carrier("fdstore", {})[0] == "fdstore"


def test_make_state_session_closes_the_listen_fds(kernel: FakeBackend) -> None:
    fd = make_memfd(b"left over")
    carrier = make_carrier(
        "auto", kernel, [ListenFd(fd, "x")], service_manager="/nonexistent", environ={}
    )
    assert isinstance(carrier, StateSessionCarrier)
    assert not fdinfo.is_valid_fd(fd)
    carrier.close()


def test_make_fdstore(kernel: FakeBackend, tmp_path: Path) -> None:
    absent = str(tmp_path / "no-manager")
    carrier = make_carrier("auto", kernel, [], service_manager=absent, environ=STORE)
    assert isinstance(carrier, FdStoreCarrier)
    assert carrier.store_max == 65536
    # No service manager to ask: a kexec might lose the store.
    assert carrier.kexec_problem is not None and absent in carrier.kexec_problem
    carrier.close()


def test_fdstore_without_a_service_manager_is_refused(kernel: FakeBackend) -> None:
    fd = make_memfd(b"kept")
    with pytest.raises(SystemExit, match="needs a service manager with an fd store"):
        make_carrier("fdstore", kernel, [ListenFd(fd, "x")], service_manager="/x", environ={})
    assert fdinfo.is_valid_fd(fd)  # refused before it took anything over
    os.close(fd)


def test_an_unknown_carrier_is_refused(kernel: FakeBackend) -> None:
    with pytest.raises(ValueError, match="unknown carrier 'pigeon'"):
        make_carrier("pigeon", kernel, [], service_manager="/x", environ={})
