"""luod.quotas and the custodian's use of them, against the fake kernel, in
process: each uid's pool is its own, root has its own, a refusal names the
resource and the limit, changes nothing and closes every fd of the call;
and luod's quota options."""

from __future__ import annotations

import argparse
import os
import resource
from typing import Any

import pytest

from luod import daemon, errors, quotas
from luod.custody import Custodian, Handoff
from luod.model import Holdings
from luod.peer import Peer
from luod.quotas import Limits, Quotas
from testsupport.fakekernel import FakeBackend
from testsupport.util import fd_is_open, make_memfd

ROOT = Peer(pid=1, uid=0, gid=0, comm="root-client")
ALICE = Peer(pid=2, uid=1000, gid=1000, unit="alice.service")
NOBODY = Peer(pid=3, uid=65534, gid=65534, comm="intruder")

SMALL = Quotas(user=Limits(sessions=2, files=3, bytes=100), root=Limits(sessions=4))


@pytest.fixture
def custodian_options() -> dict[str, Any]:
    """The `custodian` fixture's (tests/unit/conftest.py) options."""
    return {"quotas": SMALL}


_names = iter(range(10**6))


def _files(*sizes: int) -> list[Handoff]:
    return [
        Handoff(f"f{next(_names)}", make_memfd(b"x" * n), f"files[{i}]")
        for i, n in enumerate(sizes)
    ]


def _refused(c: Custodian, resource: str, limit: int, call: object) -> None:
    """`call` is refused with QuotaExceeded(resource, limit) and changes nothing."""
    before = {k: (s.kernel_name, sorted(s.files)) for k, s in c.sessions.items()}
    counter = c.ledger.name_counter
    with pytest.raises(errors.QuotaExceeded) as e:
        call()  # type: ignore[operator]
    assert (e.value.resource, e.value.limit) == (resource, limit)
    assert {k: (s.kernel_name, sorted(s.files)) for k, s in c.sessions.items()} == before
    assert c.ledger.name_counter == counter


def test_sessions_per_uid(custodian: Custodian) -> None:
    custodian.create_session(NOBODY, "a")
    custodian.create_session(NOBODY, "b")
    _refused(custodian, "sessions", 2, lambda: custodian.create_session(NOBODY, "c"))
    _refused(custodian, "sessions", 2, lambda: custodian.create_delegated(NOBODY, "c"))
    files = _files(1)
    _refused(
        custodian, "sessions", 2, lambda: custodian.preserve_fds(NOBODY, "c", files, create=True)
    )
    assert not fd_is_open(files[0].fd)
    # A hand-off into a session it holds needs no new one.
    custodian.preserve_fds(NOBODY, "a", _files(1))
    # Another uid's pool is its own: nobody's use takes nothing from Alice.
    custodian.create_session(ALICE, "a")
    custodian.create_session(ALICE, "b")
    # Root has a pool of its own.
    for name in "abcd":
        custodian.create_session(ROOT, name)
    _refused(custodian, "sessions", 4, lambda: custodian.create_session(ROOT, "e"))
    # Letting go makes room again.
    custodian.discard_session(NOBODY, "b")
    custodian.create_session(NOBODY, "c")


def test_adopted_sessions_count(custodian: Custodian, kernel: FakeBackend) -> None:
    custodian.create_session(NOBODY, "a")
    custodian.adopt_session(NOBODY, kernel.create_session("vm-1"))
    sfd = kernel.create_session("vm-2")
    _refused(custodian, "sessions", 2, lambda: custodian.adopt_session(NOBODY, sfd))
    assert not fd_is_open(sfd)


def test_files_and_bytes_per_uid(custodian: Custodian) -> None:
    custodian.preserve_fds(NOBODY, "s", _files(10, 10), create=True)
    # All or nothing: two more files would be four.
    batch = _files(1, 1)
    _refused(custodian, "files", 3, lambda: custodian.preserve_fds(NOBODY, "s", batch))
    assert not any(fd_is_open(h.fd) for h in batch)
    # One more file fits, but not 81 more bytes.
    big = _files(81)
    _refused(custodian, "bytes", 100, lambda: custodian.preserve_fds(NOBODY, "s", big))
    assert not fd_is_open(big[0].fd)
    # Nor in a new session: the session is not even created.
    big = _files(81)
    _refused(custodian, "bytes", 100, lambda: custodian.preserve_fds(NOBODY, "t", big, create=True))
    custodian.preserve_fds(NOBODY, "s", _files(80))
    assert custodian.status(NOBODY.uid) == Holdings(sessions=1, files=3, bytes_pinned=100)
    # Alice's pool is untouched by nobody's, and root's bytes are unlimited.
    custodian.preserve_fds(ALICE, "s", _files(100), create=True)
    custodian.preserve_fds(ROOT, "s", _files(1 << 20, 1 << 20, 1 << 20, 1 << 20), create=True)
    # Taking a file back frees its share.
    first = next(iter(custodian.sessions[(NOBODY.uid, "s")].files))
    fd, _ = custodian.retrieve_fd(NOBODY, "s", first, take=True)
    os.close(fd)
    custodian.preserve_fds(NOBODY, "s", _files(10))


ALL_HELD = Quotas(max_held=10, held_reserved_for_root=2)


def _full(c: Custodian, limit: int, call: object, option: str = "--max-held") -> None:
    """`call` is refused with CustodyFull(limit, option) and changes nothing."""
    before = {k: (s.kernel_name, sorted(s.files)) for k, s in c.sessions.items()}
    with pytest.raises(errors.CustodyFull) as e:
        call()  # type: ignore[operator]
    assert (e.value.limit, e.value.option) == (limit, option)
    assert {k: (s.kernel_name, sorted(s.files)) for k, s in c.sessions.items()} == before


@pytest.mark.parametrize("custodian_options", [{"quotas": ALL_HELD}])
def test_what_all_uids_hold_together_is_bounded_with_a_reserve_for_root(
    custodian: Custodian, kernel: FakeBackend
) -> None:
    """Each uid within its own quota, many uids together could fill luod's
    fd table (64 at their files quota fill LimitNOFILE=): sessions and files
    of all uids are bounded together, and the last of it is root's alone."""
    custodian.preserve_fds(NOBODY, "s", _files(1, 1, 1), create=True)
    custodian.preserve_fds(ALICE, "s", _files(1, 1, 1), create=True)  # 8 held: 2 + 6
    batch = _files(1)
    _full(custodian, 8, lambda: custodian.preserve_fds(ALICE, "s", batch))
    assert not fd_is_open(batch[0].fd)
    _full(custodian, 8, lambda: custodian.create_session(NOBODY, "t"))
    _full(custodian, 8, lambda: custodian.create_delegated(ALICE, "t"))
    sfd = kernel.create_session("vm-1")
    _full(custodian, 8, lambda: custodian.adopt_session(NOBODY, sfd))
    assert not fd_is_open(sfd)
    # Root's reserve: a session and a file.
    custodian.preserve_fds(ROOT, "s", _files(1), create=True)
    _full(custodian, 10, lambda: custodian.preserve_fds(ROOT, "s", _files(1)))
    # Taking a file back makes room, for root only while the others are
    # over their share.
    taken = next(iter(custodian.sessions[(NOBODY.uid, "s")].files))
    fd, _ = custodian.retrieve_fd(NOBODY, "s", taken, take=True)
    os.close(fd)
    _full(custodian, 8, lambda: custodian.preserve_fds(NOBODY, "s", _files(1)))
    custodian.preserve_fds(ROOT, "s", _files(1))


ALL_USERS_BYTES = Quotas(max_bytes_all_users=100)


@pytest.mark.parametrize("custodian_options", [{"quotas": ALL_USERS_BYTES}])
def test_what_all_users_pin_together_is_bounded_root_apart(custodian: Custodian) -> None:
    """The kernel allocates every page of a memfd luod preserves, holes
    included, and charges them to luod: a uid's sparse memfds at its bytes
    quota cost it nothing, and many uids at theirs would take the memory
    root's hand-off needs. Every uid but root together pins at most
    --max-bytes-all-users; root's bytes are its own pool."""
    custodian.preserve_fds(NOBODY, "s", _files(30, 30), create=True)
    custodian.preserve_fds(ALICE, "s", _files(30), create=True)  # 90 pinned
    batch = _files(5, 6)
    _full(
        custodian, 100, lambda: custodian.preserve_fds(ALICE, "s", batch), "--max-bytes-all-users"
    )
    assert not any(fd_is_open(h.fd) for h in batch)
    # Nor into a new session: it is not even created.
    big = _files(11)
    _full(
        custodian,
        100,
        lambda: custodian.preserve_fds(NOBODY, "t", big, create=True),
        "--max-bytes-all-users",
    )
    # Root's bytes are not counted, nor limited by the others'.
    custodian.preserve_fds(ROOT, "s", _files(1000), create=True)
    custodian.preserve_fds(ALICE, "s", _files(10))  # 100: at the cap, not over
    _full(
        custodian,
        100,
        lambda: custodian.preserve_fds(NOBODY, "s", _files(1)),
        "--max-bytes-all-users",
    )
    # Empty files pin nothing; a session needs no bytes.
    custodian.preserve_fds(NOBODY, "s", _files(0))
    custodian.create_session(NOBODY, "u")
    # Taking a file back, or discarding a session, makes room.
    taken = next(iter(custodian.sessions[(NOBODY.uid, "s")].files))
    fd, _ = custodian.retrieve_fd(NOBODY, "s", taken, take=True)
    os.close(fd)
    custodian.preserve_fds(ALICE, "s", _files(30))
    custodian.discard_session(ALICE, "s")
    custodian.preserve_fds(NOBODY, "s", _files(60))


class _Uncounted:
    """What luod holds, for quotas that must not count it."""

    def holdings(self, uid: int | None = None) -> Holdings:
        raise AssertionError("counted without a limit")

    def held_fds(self) -> int:
        raise AssertionError("counted without a limit")

    def users_bytes(self) -> int:
        raise AssertionError("counted without a limit")


def test_no_limits_count_nothing() -> None:
    q = Quotas(user=Limits(), root=Limits())
    q.check(1000, _Uncounted(), sessions=10**6, files=10**6, size=10**12)
    # Root's bytes are no one else's business.
    Quotas(root=Limits(), max_bytes_all_users=1).check(0, _Uncounted(), size=10**12)


def test_defaults_and_options() -> None:
    assert Limits(sessions=64, files=4096, bytes=1 << 30) == quotas.USER_DEFAULTS
    assert Limits() == quotas.ROOT_DEFAULTS
    args = daemon.build_parser().parse_args([])
    half = resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2
    quarter = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    assert quotas.from_options(args) == Quotas(
        max_held=half, held_reserved_for_root=half // 8, max_bytes_all_users=quarter
    )
    args = daemon.build_parser().parse_args(
        [
            "--max-sessions-per-user=8",
            "--max-files-per-user=100",
            "--max-bytes-per-user=512M",
            "--max-sessions-root=1000",
            "--max-files-root=0",
            "--max-bytes-root=2GiB",
            "--max-held=80",
            "--max-bytes-all-users=8G",
        ]
    )
    assert quotas.from_options(args) == Quotas(
        user=Limits(8, 100, 512 << 20),
        root=Limits(1000, 0, 2 << 30),
        max_held=80,
        held_reserved_for_root=10,
        max_bytes_all_users=8 << 30,
    )
    assert [quotas.parse_size(s) for s in ("0", "4096", "1k", "1K", "3MiB", "1G", "2T")] == [
        0,
        4096,
        1024,
        1024,
        3 << 20,
        1 << 30,
        2 << 40,
    ]
    for bad in ("", "-1", "1.5G", "lots", "1X"):
        with pytest.raises(argparse.ArgumentTypeError):
            quotas.parse_size(bad)
    for bad in ("-1", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            quotas.count(bad)
    help_text = daemon.build_parser().format_help()
    for option in (
        "--max-sessions-per-user",
        "--max-bytes-root",
        "--max-held",
        "--max-bytes-all-users",
        "QuotaExceeded",
    ):
        assert option in help_text


def test_the_refusal_says_what_and_how_much() -> None:
    e = errors.QuotaExceeded("sessions", 64)
    assert e.parameters == {"resource": "sessions", "limit": 64}
    assert str(e).startswith("quota exceeded: at most 64 sessions per user")
    assert errors.CATALOGUE["io.luod.Custody.QuotaExceeded"] is errors.QuotaExceeded
    full = errors.CustodyFull("bytes pinned for all users but root", 4096, "--max-bytes-all-users")
    assert str(full) == (
        "luod holds as many bytes pinned for all users but root as it may (4096); nothing was "
        "changed: release some (DiscardSession, RetrieveFd take), or ask for a larger "
        "--max-bytes-all-users"
    )
