"""Unit tests of luod.carriers.slots: the two-slot manifest memfd."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from luod.carriers.slots import (
    Found,
    SlotMemfd,
    SlotWriter,
    capacity_for,
    newest,
    read_newest,
    slot_capacity,
    write_slot,
)
from luod.manifest import ManifestError


@pytest.fixture
def memfd_of() -> Iterator[Callable[[int], int]]:
    """Makes memfds of a given size, closed after the test."""
    made: list[int] = []

    def make(size: int) -> int:
        made.append(os.memfd_create("m", os.MFD_CLOEXEC))
        os.ftruncate(made[-1], size)
        return made[-1]

    yield make
    for fd in made:
        os.close(fd)


@pytest.fixture
def memfd(memfd_of: Callable[[int], int]) -> tuple[int, int]:
    """A memfd sized for a small manifest, and its size."""
    size = capacity_for(1000)
    return memfd_of(size), size


def test_two_slots_newest_wins_and_torn_write_falls_back(memfd: tuple[int, int]) -> None:
    fd, size = memfd
    write_slot(fd, size, 0, 1, b"first")
    write_slot(fd, size, 1, 2, b"second")
    assert read_newest(fd).payload == b"second"
    # A torn write into slot 1: its checksum no longer matches.
    os.pwrite(fd, b"X", size // 2 + 60)
    assert read_newest(fd).payload == b"first"
    os.pwrite(fd, b"garbage!", 0)
    with pytest.raises(ManifestError) as e:
        read_newest(fd)
    assert e.value.kind == "corrupt"


def test_payload_too_big_for_slot(memfd_of: Callable[[int], int]) -> None:
    with pytest.raises(ValueError):
        write_slot(memfd_of(4096), 4096, 0, 1, b"x" * 4096)


def test_newest_wins_whichever_slot_holds_it(memfd: tuple[int, int]) -> None:
    fd, size = memfd
    write_slot(fd, size, 1, 7, b"seven")
    write_slot(fd, size, 0, 8, b"eight")
    read = read_newest(fd)
    assert (read.seq, read.slot, read.payload) == (8, 0, b"eight")


def test_unknown_slot_format_is_a_version_problem(memfd: tuple[int, int]) -> None:
    fd, size = memfd
    write_slot(fd, size, 0, 1, b"x")
    os.pwrite(fd, (99).to_bytes(4, "little"), 8)  # the format, after the magic
    with pytest.raises(ManifestError) as e:
        read_newest(fd)
    assert e.value.kind == "version"


def test_too_small_memfd_is_corrupt(memfd_of: Callable[[int], int]) -> None:
    with pytest.raises(ManifestError, match="too small"):
        read_newest(memfd_of(10))


def test_capacity_leaves_room_to_grow() -> None:
    for n in (0, 1000, 100_000, 1_000_000):
        size = capacity_for(n)
        assert size >= 64 * 1024
        assert slot_capacity(size) >= 2 * n


def test_writer_alternates_slots_and_a_torn_write_keeps_the_last_good_copy() -> None:
    w = SlotWriter(("a", "b"))
    new = w.save(b"one")
    assert new is not None and (new.name, new.slot) == ("a", 0)
    assert w.replace(new) is None
    assert w.save(b"two") is None  # it fits: written in place
    assert (new.slot, w.seq) == (1, 2)
    assert read_newest(new.fd).payload == b"two"
    # The next write goes to slot 0; tear it: slot 1 still holds "two".
    assert w.save(b"three") is None
    assert new.slot == 0
    os.pwrite(new.fd, b"X", 60)
    assert read_newest(new.fd).payload == b"two"
    w.close()
    assert w.current is None


def test_writer_grows_into_a_new_memfd_under_the_other_name() -> None:
    w = SlotWriter(("a", "b"))
    first = w.save(b"small")
    assert first is not None
    w.replace(first)
    big = b"x" * (slot_capacity(first.size) + 1)
    second = w.save(big)
    assert second is not None
    assert second.name == "b" and second.size > first.size and second.slot == 0
    assert w.current is first  # not replaced until the carrier says so
    assert read_newest(second.fd).payload == big
    assert read_newest(second.fd).seq == 2
    old = w.replace(second)
    assert old is first
    os.close(first.fd)
    third = w.save(b"y" * (slot_capacity(second.size) + 1))
    assert third is not None and third.name == "a"
    os.close(third.fd)
    w.close()


def test_writer_with_one_name_reuses_it() -> None:
    w = SlotWriter(("only",))
    first = w.save(b"x")
    assert first is not None
    w.replace(first)
    second = w.save(b"y" * (slot_capacity(first.size) + 1))
    assert second is not None and second.name == "only"
    os.close(second.fd)
    w.close()


def test_writer_follows_an_incoming_manifest(memfd: tuple[int, int]) -> None:
    fd, size = memfd
    write_slot(fd, size, 1, 41, b"old")
    found = newest([("m", fd)])
    assert found is not None
    # Only the sequence number: the next save makes a new memfd.
    w = SlotWriter(("a",))
    w.follow(found, write_in_it=False)
    new = w.save(b"new")
    assert new is not None and read_newest(new.fd).seq == 42
    os.close(new.fd)
    # Writing on in the incoming memfd: slot 0 is next, and newer.
    w = SlotWriter(("a",))
    w.follow(found, write_in_it=True)
    assert w.save(b"on") is None
    read = read_newest(fd)
    assert (read.seq, read.slot, read.payload, read.records) == (42, 0, b"on", [])
    w.current = None  # the fixture closes the memfd


def test_newest_of_several_memfds(memfd_of: Callable[[int], int]) -> None:
    one = SlotMemfd.create("one", 5, b"five")
    two = SlotMemfd.create("two", 9, b"nine")
    broken = memfd_of(capacity_for(0))
    told: list[str] = []
    try:
        found = newest(
            [("one", one.fd), ("broken", broken), ("two", two.fd)],
            unreadable=lambda name, _e: told.append(name),
        )
        assert isinstance(found, Found)
        assert (found.name, found.fd, found.read.payload) == ("two", two.fd, b"nine")
        assert told == ["broken"]
        assert newest([]) is None
        # None readable: the last reason is raised, never "nothing there".
        why = ManifestError("corrupt", "no manifest in there")
        with pytest.raises(ManifestError, match="no manifest in there"):
            newest([("broken", broken), ("gone", why)])
        with pytest.raises(ManifestError, match="slot 0: no manifest"):
            newest([("gone", why), ("broken", broken)])
        # One readable is enough.
        found = newest([("gone", why), ("one", one.fd)])
        assert found is not None and found.name == "one"
    finally:
        for fd in (one.fd, two.fd):
            os.close(fd)


# --- the log: changes appended after the base (issue 12) ------------------------------


def _writer(payload: bytes = b"base") -> SlotWriter:
    w = SlotWriter(("a", "b"))
    new = w.save(payload)
    assert new is not None
    w.replace(new)
    return w


def test_records_are_read_back_in_order() -> None:
    w = _writer()
    try:
        assert w.append(b"one") and w.append(b"two")
        assert w.current is not None
        read = read_newest(w.current.fd)
        assert (read.seq, read.payload, read.records) == (3, b"base", [b"one", b"two"])
        # A new base leaves the log behind: it starts empty.
        assert w.save(b"base2") is None and w.append(b"three")
        read = read_newest(w.current.fd)
        assert (read.seq, read.payload, read.records) == (5, b"base2", [b"three"])
    finally:
        w.close()


def test_a_torn_record_ends_the_log() -> None:
    w = _writer()
    try:
        assert w.append(b"kept") and w.append(b"torn")
        assert w.current is not None
        fd, size = w.current.fd, w.current.size
        read = read_newest(fd)
        # The second record's last byte never reached the memfd.
        at = read.log_end - 8 - 1
        os.pwrite(fd, b"X", at)
        read = read_newest(fd)
        assert (read.seq, read.records) == (2, [b"kept"])
        # A writer following it appends where the intact log ends.
        w2 = SlotWriter(("a", "b"))
        found = newest([("a", fd)])
        assert found is not None
        w2.follow(found, write_in_it=True)
        assert w2.append(b"after")
        assert read_newest(fd).records == [b"kept", b"after"]
        assert size == os.fstat(fd).st_size
        w2.current = None  # w closes the memfd
    finally:
        w.close()


def test_records_of_an_earlier_use_of_the_slot_are_not_read() -> None:
    w = _writer(b"x" * 200)
    try:
        for i in range(3):
            assert w.append(b"old%d" % i)
        w.save(b"other slot")
        # Back in the first slot, with a shorter base: the old records
        # beyond it do not follow its sequence number.
        w.save(b"x")
        assert w.current is not None
        read = read_newest(w.current.fd)
        assert (read.payload, read.records) == (b"x", [])
    finally:
        w.close()


def test_the_log_never_outgrows_its_base() -> None:
    w = _writer(b"b" * 70_000)
    try:
        record = b"r" * 1000
        appended = 0
        while w.append(record):
            appended += 1
        # About the base's size in records, then a new base is due.
        assert 60 <= appended <= 70
        assert w.current is not None
        assert len(read_newest(w.current.fd).records) == appended
    finally:
        w.close()
