"""Unit tests of luod.manifest: the manifest's JSON form, and what it refuses."""

from __future__ import annotations

import json

import pytest

from luod.manifest import MANIFEST_VERSION, Manifest, ManifestError, from_json, to_json
from luod.model import HeldFile, Owner, Session, SessionKind, SessionState


def _manifest() -> Manifest:
    s = Session(
        "cache", SessionKind.MANAGED, Owner(1000, "app.service", "app"), "luod.3.cache", 1.5
    )
    s.files["idx"] = HeldFile("idx", 1, 4096, 2.5)
    s.files["log"] = HeldFile("log", 2, 10, 3.0)
    return Manifest([s], kexec_count=2, name_counter=3, written_at=9.0, boot_id="b")


def test_roundtrip() -> None:
    m = from_json(to_json(_manifest()))
    (s,) = m.sessions
    assert (s.name, s.kind, s.owner, s.kernel_name) == (
        "cache",
        SessionKind.MANAGED,
        Owner(1000, "app.service", "app"),
        "luod.3.cache",
    )
    assert [(f.name, f.token, f.size) for f in s.files.values()] == [
        ("idx", 1, 4096),
        ("log", 2, 10),
    ]
    assert (m.kexec_count, m.name_counter, m.boot_id) == (2, 3, "b")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("sessions"),
        lambda d: d.update(kexecCount="2"),
        lambda d: d.update(kexecCount=True),
        lambda d: d["sessions"][0].update(kind="mystery"),
        lambda d: d["sessions"][0]["files"][1].update(token=1),
        lambda d: d["sessions"].append(dict(d["sessions"][0])),
        lambda d: d["sessions"][0]["owner"].update(unit=5),
        lambda d: d["sessions"][0].update(state="gone"),
        lambda d: d["sessions"][0].update(claimDeadline="soon"),
        lambda d: d["sessions"][0].update(claimDeadline=True),
    ],
)
def test_corrupt_is_refused(mutate: object) -> None:
    doc = json.loads(to_json(_manifest()))
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(ManifestError) as e:
        from_json(json.dumps(doc).encode())
    assert e.value.kind == "corrupt"


def test_unknown_version() -> None:
    doc = json.loads(to_json(_manifest()))
    doc["version"] = 99
    with pytest.raises(ManifestError) as e:
        from_json(json.dumps(doc).encode())
    assert e.value.kind == "version"
    assert "version 99" in e.value.message


def test_state_and_claim_deadline_roundtrip() -> None:
    # A luod restarted in the same boot needs both: an adopted session that
    # came over the last kexec is still incoming, with its deadline.
    m = _manifest()
    m.sessions[0].state = SessionState.INCOMING
    m.sessions[0].claim_deadline = 1234.5
    (s,) = from_json(to_json(m)).sessions
    assert (s.state, s.claim_deadline) == (SessionState.INCOMING, 1234.5)
    # Manifests written before these fields existed: outgoing, no deadline.
    doc = json.loads(to_json(_manifest()))
    del doc["sessions"][0]["state"], doc["sessions"][0]["claimDeadline"]
    (s,) = from_json(json.dumps(doc).encode()).sessions
    assert (s.state, s.claim_deadline) == (SessionState.OUTGOING, None)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("x", "manifest: sessions[0].files[1] is not an object"),
        ({"name": "x", "token": 3, "size": 1}, "manifest: sessions[0].files[1] has no 'preserved'"),
        (
            {"name": "x", "token": True, "size": 1, "preserved": 1.0},
            "manifest: sessions[0].files[1].token has the wrong type",
        ),
        (
            {"name": "x", "token": 3, "size": 1.5, "preserved": 1.0},
            "manifest: sessions[0].files[1].size has the wrong type",
        ),
        (
            {"name": 7, "token": 3, "size": 1, "preserved": 1.0},
            "manifest: sessions[0].files[1].name has the wrong type",
        ),
    ],
)
def test_bad_file_entry_is_named(entry: object, message: str) -> None:
    """Well-formed entries take a shortcut; anything else the checked path."""
    doc = json.loads(to_json(_manifest()))
    doc["sessions"][0]["files"][1] = entry
    with pytest.raises(ManifestError) as e:
        from_json(json.dumps(doc).encode())
    assert (e.value.kind, e.value.message) == ("corrupt", message)


def test_file_entry_with_more_fields_is_read() -> None:
    """A newer luod may add fields to a file entry; they are ignored."""
    doc = json.loads(to_json(_manifest()))
    doc["sessions"][0]["files"][1]["checksum"] = "abc"
    (s,) = from_json(json.dumps(doc).encode()).sessions
    assert [(f.name, f.token, f.size, f.preserved_at) for f in s.files.values()] == [
        ("idx", 1, 4096, 2.5),
        ("log", 2, 10, 3.0),
    ]


# What luod 0.1 (manifest version 1, session names unique in all of luod)
# wrote, byte for byte: it must still read after an upgrade across a kexec.
VERSION_1 = (
    b'{"version":1,"generator":"luod","bootId":"b1","kexecCount":1,"nameCounter":2,'
    b'"written":9.0,"subscribers":[{"name":"vmm","uid":1000}],"sessions":[{"name":"app",'
    b'"kind":"managed","kernelName":"luod.1.app","state":"outgoing","claimDeadline":null,'
    b'"owner":{"uid":0,"unit":null,"comm":"luoctl"},"created":1.5,"files":[{"name":"idx",'
    b'"token":1,"size":4096,"preserved":2.5}]},{"name":"vm","kind":"delegated",'
    b'"kernelName":"luod.2.vm","state":"incoming","claimDeadline":99.0,"owner":{"uid":1000,'
    b'"unit":"vmm.service","comm":"vmm"},"created":3.0,"files":[]}]}'
)


def test_version_1_reads_with_each_session_scoped_by_its_owner() -> None:
    m = from_json(VERSION_1)
    assert [(s.key, s.kind, s.kernel_name) for s in m.sessions] == [
        ((0, "app"), SessionKind.MANAGED, "luod.1.app"),
        ((1000, "vm"), SessionKind.DELEGATED, "luod.2.vm"),
    ]
    vm = m.sessions[1]
    assert (vm.state, vm.claim_deadline, vm.owner.unit) == (
        SessionState.INCOMING,
        99.0,
        "vmm.service",
    )
    assert [(f.name, f.token, f.size) for f in m.sessions[0].files.values()] == [("idx", 1, 4096)]
    assert (m.kexec_count, m.name_counter, m.boot_id) == (1, 2, "b1")
    # Written again, it is the current version.
    assert json.loads(to_json(m))["version"] == MANIFEST_VERSION == 2


def test_one_name_for_two_owners_but_not_twice_for_one() -> None:
    doc = json.loads(to_json(_manifest()))
    theirs = json.loads(json.dumps(doc["sessions"][0]))
    theirs["owner"]["uid"] = 65534
    theirs["kernelName"] = "luod.4.u65534.cache"
    doc["sessions"].append(theirs)
    m = from_json(json.dumps(doc).encode())
    assert [s.key for s in m.sessions] == [(1000, "cache"), (65534, "cache")]
    # A version 1 manifest with that would have been refused as corrupt by
    # luod 0.1; this luod reads it, since names never were its identity.
    doc["sessions"].append(json.loads(json.dumps(theirs)))
    with pytest.raises(ManifestError) as e:
        from_json(json.dumps(doc).encode())
    assert e.value.message == "manifest: session 'cache' of uid 65534 appears twice"


def test_takes_waiting_roundtrip_in_the_manifest_and_its_records() -> None:
    """A take whose reply has not gone out is recorded (luod.custody): the
    session it was taken from with the files taken, under the name luod's
    references to them are kept under. The whole manifest names every take
    waiting; a record only those recorded and settled since the record
    before. None waiting, the manifest is as luod before them wrote it."""
    from luod.manifest import change_json

    m = _manifest()
    assert b"taking" not in to_json(m)
    assert b"took" not in change_json(m, [], [])
    took = Session("db", SessionKind.MANAGED, Owner(0), "taken.luod.9.u0.db", 4.0)
    took.files["x"] = HeldFile("x", 3, 100, 5.0)
    own = Session("own", SessionKind.DELEGATED, Owner(7), "luod.4.u7.own", 1.0)

    def said(read: Manifest) -> dict[int, tuple[str, SessionKind, int, str, list[str]]]:
        return {
            n: (t.name, t.kind, t.owner.uid, t.kernel_name, list(t.files))
            for n, t in read.taking.items()
        }

    both = {
        1: ("db", SessionKind.MANAGED, 0, "taken.luod.9.u0.db", ["x"]),
        2: ("own", SessionKind.DELEGATED, 7, "luod.4.u7.own", []),
    }
    m.taking = {1: took, 2: own}
    assert said(from_json(to_json(m))) == both
    base = to_json(_manifest())
    records = [change_json(m, [], [], took=[(1, took)]), change_json(m, [], [], took=[(2, own)])]
    read = from_json(base, records)
    assert said(read) == both
    assert [s.name for s in read.sessions] == ["cache"]
    # A record that names no take leaves them as they were; one that
    # settles a take ends it.
    records.append(change_json(m, [], []))
    assert said(from_json(base, records)) == both
    records.append(change_json(m, [], [], settled=[1]))
    assert said(from_json(base, records)) == {2: both[2]}
    # Records carry only what changed: a take waiting is not written again.
    assert b'"own"' not in records[-1] and b'"own"' not in records[-2]


@pytest.mark.parametrize("taking", ["x", [{"name": "db"}], [5], [[1, 2]], [["1", {}]]])
def test_a_bad_take_waiting_is_corrupt(taking: object) -> None:
    doc = json.loads(to_json(_manifest()))
    doc["taking"] = taking
    with pytest.raises(ManifestError) as e:
        from_json(json.dumps(doc).encode())
    assert e.value.kind == "corrupt"
