"""A hand-off into a session the manifest names already records just the
files it added (luod.ledger.commit_added, the manifest log's "add"), not
the whole session again: a call's manifest write is proportional to what
it changed (issue 12)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from luod.ledger import Ledger
from luod.manifest import Manifest, ManifestError, change_json, from_json, to_json
from luod.model import HeldFile, HeldFiles, Owner, Session, SessionKind
from tests.unit.test_ledger import LogCarrier, _held_session
from testsupport.fakekernel import FakeBackend
from testsupport.util import make_memfd


@pytest.fixture
def logged(kernel: FakeBackend) -> Iterator[tuple[Ledger, LogCarrier]]:
    carrier = LogCarrier(kernel, 1000)
    ledger = Ledger(kernel, carrier, clock=lambda: 42.0, boot_id="boot-1")
    yield ledger, carrier
    ledger.close()


def _add(ledger: Ledger, s: Session, names: list[str]) -> list[HeldFile]:
    added = []
    for name in names:
        f = HeldFile(name, s.next_token(), 1, 0.0, make_memfd(b"x"))
        ledger.backend.preserve_fd(s.fd, f.fd, f.token)
        s.files[name] = f
        ledger.index(s, f)
        added.append(f)
    return added


def _files(raw: bytes, records: list[bytes]) -> dict[tuple[int, str], dict[str, int]]:
    m = from_json(raw, records)
    return {s.key: {f.name: f.token for f in s.files.values()} for s in m.sessions}


def test_files_added_to_a_named_session_are_all_the_record_holds(
    logged: tuple[Ledger, LogCarrier],
) -> None:
    ledger, carrier = logged
    s = _held_session(ledger, "big", {f"old{i}": b"o" for i in range(100)})
    ledger.save()
    ledger.commit_added(s, _add(ledger, s, ["new1", "new2"]))
    (record,) = carrier.records
    assert b'"new1"' in record and b'"new2"' in record and b'"old1"' not in record
    assert _files(carrier.base, carrier.records) == _files(to_json(ledger.manifest()), [])
    # Several records in a row, and another session changed meanwhile.
    other = _held_session(ledger, "other", {"a": b"a"})
    ledger.commit_added(s, _add(ledger, s, ["new3"]))
    ledger.commit_added(other, _add(ledger, other, ["b"]))
    assert _files(carrier.base, carrier.records) == _files(to_json(ledger.manifest()), [])
    assert len(_files(carrier.base, carrier.records)[(0, "big")]) == 103


def test_a_session_not_recorded_yet_is_written_whole(logged: tuple[Ledger, LogCarrier]) -> None:
    ledger, carrier = logged
    ledger.save()
    s = _held_session(ledger, "fresh", {"a": b"a"})
    ledger.commit_added(s, _add(ledger, s, ["b"]))
    (record,) = carrier.records
    assert json.loads(record)["put"][0]["name"] == "fresh"
    assert "add" not in json.loads(record)
    assert _files(carrier.base, carrier.records) == {(0, "fresh"): {"a": 1, "b": 2}}


def _base() -> bytes:
    s = Session("s", SessionKind.MANAGED, Owner(uid=5), "luod.1.u5.s", 0.0)
    s.files["a"] = HeldFile("a", 1, 1, 0.0)
    return to_json(Manifest(sessions=[s]))


@pytest.mark.parametrize(
    "add",
    [
        [[5, "nope", []]],  # a session the manifest does not name
        [[5, "s", [{"name": "a", "token": 9, "size": 1, "preserved": 0.0}]]],  # name again
        [[5, "s", [{"name": "b", "token": 1, "size": 1, "preserved": 0.0}]]],  # token again
        [[5, "s"]],
        [["5", "s", []]],
        {"5": "s"},
    ],
)
def test_a_bad_add_is_corrupt(add: object) -> None:
    record = json.dumps({"del": [], "meta": {"kexecCount": 0, "nameCounter": 0, "written": 0}})
    doc = json.loads(record)
    doc["put"], doc["add"] = [], add
    with pytest.raises(ManifestError):
        from_json(_base(), [json.dumps(doc).encode()])


def test_change_json_add_reads_back() -> None:
    s = Session("s", SessionKind.MANAGED, Owner(uid=5), "luod.1.u5.s", 0.0)
    s.files["a"] = HeldFile("a", 1, 1, 0.0)
    new = HeldFile('é"q', 2, 7, 1.5)
    s.files[new.name] = new
    record = change_json(Manifest(sessions=[]), [], [], [(s, [new])])
    (got,) = from_json(_base(), [record]).sessions
    assert {f.name: (f.token, f.size, f.preserved_at) for f in got.files.values()} == {
        "a": (1, 1, 0.0),
        'é"q': (2, 7, 1.5),
    }


@pytest.mark.parametrize("owner", [Owner(uid=0), Owner(uid=1000, unit='a"b.service', comm="cömm")])
@pytest.mark.parametrize("deadline", [None, 5.5])
def test_texts_put_together_by_hand_are_what_the_encoder_says(
    owner: Owner, deadline: float | None
) -> None:
    """The manifest's texts put together by hand (a record per call) read
    exactly as json's encoder writes the same dicts."""
    from luod.manifest import (
        _encode,
        _file_entry,
        _meta,
        _meta_json,
        _session_head,
        _session_json,
        _with_array,
    )

    s = Session("sé", SessionKind.MANAGED, owner, "luod.1.s", 1.25, claim_deadline=deadline)
    s.files = HeldFiles({f"f{i}": HeldFile(f"f{i}", i + 1, 4096, 2.5 + i) for i in range(3)})
    files = [_file_entry(f) for f in s.files.values()]
    assert _session_json(s) == _with_array(_session_head(s), "files", files)
    for m in (
        Manifest([], 3, 7, 1.5, "boot-é", subscribers={("x", 1), ('a"b', 0)}),
        Manifest([], 0, 0, 42, ""),
    ):
        assert _meta_json(m) == _encode(_meta(m))


@pytest.mark.parametrize(
    "t",
    [
        0.0,
        1e-7,
        5e-7,
        1.5e-6,
        1.0,
        2.5,
        42.000001,
        1765040000.1234565,
        1765040000.999_999_7,
        4294967295.999999,
        float(2**32),
        1e17,
        -1.5,
        7,
    ],
)
def test_times_are_written_to_the_microsecond(t: float) -> None:
    """What _time() writes by hand is what the encoder says of the time to
    the microsecond, and reads back as the microseconds the API says."""
    from luod.manifest import _encode, _time, _usec
    from luod.varlink.types import usec

    assert _time(t) == _encode(_usec(t))
    assert usec(json.loads(_time(t))) == usec(t) or not 0 <= t < 2**32


def test_times_to_the_microsecond_at_random() -> None:
    import random

    from luod.manifest import _time, _usec

    rng = random.Random(12)
    for _ in range(20_000):
        t = rng.choice([rng.uniform(0, 2**32), rng.uniform(1.7e9, 1.8e9), rng.uniform(0, 10)])
        assert _time(t) == float.__repr__(_usec(t)), t
