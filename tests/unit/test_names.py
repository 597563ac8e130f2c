"""luod.names: which session and fd names luod accepts, and the names it
gives the kernel sessions it creates."""

from __future__ import annotations

import pytest

from luod import errors
from luod.names import (
    MAX_FD_NAME,
    MAX_KERNEL_SESSION_NAME,
    MAX_SESSION_NAME,
    check_fd_name,
    check_session_name,
    kernel_session_name,
)


@pytest.mark.parametrize(
    "name", ["app", "0", "db-state", "a_b.c@d:e+f=g-h", "xluod", "systemd2", "x" * MAX_SESSION_NAME]
)
def test_session_names_accepted(name: str) -> None:
    check_session_name(name)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "must not be empty"),
        ("x" * (MAX_SESSION_NAME + 1), f"longer than {MAX_SESSION_NAME} bytes"),
        (".hidden", "must start with a letter or digit"),
        ("-x", "must start with a letter or digit"),
        ("a/b", "use only letters, digits"),
        ("a b", "use only letters, digits"),
        ("a,b", "use only letters, digits"),
        ("é", "use only letters, digits"),
        # A trailing newline once slipped through a "$" in the pattern.
        ("app\n", "use only letters, digits"),
    ],
)
def test_session_names_refused(name: str, reason: str) -> None:
    with pytest.raises(errors.InvalidName) as e:
        check_session_name(name, "files[0].session")
    assert e.value.parameter == "files[0].session"
    assert e.value.value == name
    assert reason in e.value.reason


def test_length_counts_bytes_and_the_limit_is_the_callers() -> None:
    # Adopted sessions are named by their creator: up to the kernel's limit.
    check_session_name("x" * MAX_KERNEL_SESSION_NAME, limit=MAX_KERNEL_SESSION_NAME)
    with pytest.raises(errors.InvalidName):
        check_session_name("x" * (MAX_KERNEL_SESSION_NAME + 1), limit=MAX_KERNEL_SESSION_NAME)
    assert MAX_KERNEL_SESSION_NAME == 63


@pytest.mark.parametrize(
    ("name", "owner"),
    [("systemd", "PID 1"), ("luod", "luod's own"), ("luod.1.app", "luod's own"), ("luodx", "luod")],
)
def test_reserved_session_names(name: str, owner: str) -> None:
    with pytest.raises(errors.ReservedSessionName) as e:
        check_session_name(name)
    assert e.value.session == name
    assert owner in e.value.reason


def test_syntax_is_checked_before_reservation() -> None:
    # 'luod/x' is both reserved and malformed: the malformed name is the error.
    with pytest.raises(errors.InvalidName):
        check_session_name("luod/x")


@pytest.mark.parametrize(
    "name", ["a", "db.sqlite", "wal-0001", "x,y", "k=v", "a@b", "A_Z+0", "x" * MAX_FD_NAME]
)
def test_fd_names_accepted(name: str) -> None:
    check_fd_name(name)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "must not be empty"),
        ("x" * (MAX_FD_NAME + 1), f"longer than {MAX_FD_NAME} characters"),
        # ':' separates the names in LISTEN_FDNAMES: not a valid fd name.
        ("a:b", "a valid fd name"),
        ("a/b", "a valid fd name"),
        ("a b", "a valid fd name"),
        ("a\nb", "a valid fd name"),
        # An fd name goes into newline-separated sd_notify messages.
        ("ab\n", "a valid fd name"),
    ],
)
def test_fd_names_refused(name: str, reason: str) -> None:
    with pytest.raises(errors.InvalidName) as e:
        check_fd_name(name, "files[3].name")
    assert e.value.parameter == "files[3].name"
    assert reason in e.value.reason


def test_kernel_session_names_are_luods_and_fit_the_kernel() -> None:
    assert kernel_session_name(1, 0, "app") == "luod.1.u0.app"
    assert kernel_session_name(12, 65534, "db-state") == "luod.12.u65534.db-state"
    # Two owners' sessions of one name: two kernel names.
    assert kernel_session_name(3, 0, "cache") != kernel_session_name(4, 65534, "cache")
    # A longest name is cut, never refused; the counter and the uid (what
    # makes the name unique) always fit, even at their largest.
    long = kernel_session_name(2**64 - 1, 2**32 - 1, "x" * MAX_SESSION_NAME)
    assert len(long) == MAX_KERNEL_SESSION_NAME
    assert long.startswith(f"luod.{2**64 - 1}.u{2**32 - 1}.x")
    # No client can create or adopt a session under a name luod gives.
    with pytest.raises(errors.ReservedSessionName):
        check_session_name(kernel_session_name(1, 0, "app"), limit=MAX_KERNEL_SESSION_NAME)
