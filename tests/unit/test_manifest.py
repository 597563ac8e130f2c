"""Unit tests of luod.manifest: the manifest's JSON form, and what it refuses."""

from __future__ import annotations

import json

import pytest

from luod.manifest import Manifest, ManifestError, from_json, to_json
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
