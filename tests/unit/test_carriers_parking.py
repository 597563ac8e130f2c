"""luod.carriers.parking: references kept in a socket pair's queue."""

from __future__ import annotations

import os

from luod.carriers.parking import Parking
from luod.scmrights import SCM_MAX_FD
from testsupport.util import make_memfd


def _read(fd: int) -> bytes:
    try:
        return os.pread(fd, 16, 0)
    finally:
        os.close(fd)


def test_parked_files_outlive_every_other_reference() -> None:
    parking = Parking.create()
    fds = [make_memfd(b"file %d" % i) for i in range(SCM_MAX_FD + 5)]
    try:
        assert parking.park([(i + 1, fd) for i, fd in enumerate(fds)])
    finally:
        for fd in fds:
            os.close(fd)
    # Only the queue holds them now; a token parked twice comes back once.
    again = make_memfd(b"newer")
    assert parking.park([(1, again)])
    os.close(again)
    back = parking.take_all()
    parking.close()
    assert sorted(back) == list(range(1, SCM_MAX_FD + 6))
    assert _read(back.pop(1)) == b"newer"
    assert {t: _read(fd) for t, fd in back.items()} == {t: b"file %d" % (t - 1) for t in back}


def test_copies_leave_every_reference_parked() -> None:
    """copy_all() peeks: the queue still holds every reference after it
    (a luod killed while taking references back loses none)."""
    parking = Parking.create()
    fds = [make_memfd(b"file %d" % i) for i in range(SCM_MAX_FD + 5)]
    try:
        assert parking.park([(i + 1, fd) for i, fd in enumerate(fds[:3])])
        assert parking.park([(i + 1, fd) for i, fd in enumerate(fds)])
    finally:
        for fd in fds:
            os.close(fd)
    want = {t: b"file %d" % (t - 1) for t in range(1, SCM_MAX_FD + 6)}
    copied = parking.copy_all()
    assert copied is not None
    assert {t: _read(fd) for t, fd in copied.items()} == want
    # The copy peeked from the start each time, and the parking still works.
    again = parking.copy_all()
    assert again is not None and sorted(again) == sorted(want)
    for fd in again.values():
        os.close(fd)
    back = parking.take_all()
    parking.close()
    assert {t: _read(fd) for t, fd in back.items()} == want


def test_a_full_queue_is_compacted() -> None:
    """A message per hand-off fills the socket buffer after some hundreds;
    parked again in full messages, thousands fit."""
    parking = Parking.create()
    memfd = make_memfd(b"x")
    try:
        token = 0
        while parking.park([(token + 1, memfd)]):
            token += 1
            assert token < 100_000
        full = token
        assert parking.compact([(token + 1, memfd)])
        more = [(full + 2 + i, memfd) for i in range(3000)]
        assert parking.park(more)
        back = parking.take_all()
        assert sorted(back) == list(range(1, full + 3002))
        for fd in back.values():
            os.close(fd)
    finally:
        os.close(memfd)
        parking.close()


def test_what_one_end_holds_comes_back_through_it_alone() -> None:
    """A luod restarted takes both ends from the store; from either one
    alone (the other lost) it still gets what was parked."""
    parking = Parking.create()
    memfd = make_memfd(b"kept")
    assert parking.park([(7, memfd)])
    os.close(memfd)
    receiving = Parking.of_fds([os.dup(parking.filenos()[1])])
    parking.close()
    back = receiving.take_all()
    assert not receiving.park([(8, back[7])])  # a lone end cannot park more
    receiving.close()
    assert _read(back[7]) == b"kept"
