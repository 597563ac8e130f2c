"""luod's own metadata across the kexec: the manifest and its JSON form.

The kernel carries bare u64 tokens; who owns a session, what its files are
called and which token is which only survive if luod writes them down. The
manifest is versioned JSON; this module turns luod's sessions into it and
back, and refuses what it cannot trust (ManifestError). How the JSON is
kept in a checksummed two-slot memfd is luod.carriers.slots' concern.
"""

from __future__ import annotations

import dataclasses
import json
import json.encoder
import math
from collections.abc import Callable, Sequence
from typing import Any

from luod.model import HeldFile, HeldFiles, Owner, Session, SessionKind, SessionState
from luod.record import record

# 2: session names are unique per owner (uid), not globally: two sessions
# may share a name if their owners differ. A version 1 manifest (names were
# unique) reads as it is: each session keeps the owner it names. luod 0.1
# refuses version 2 ("not known"), and so releases nothing, where it would
# otherwise take two sessions of one name for corruption.
MANIFEST_VERSION = 2
READS_VERSIONS = frozenset({1, MANIFEST_VERSION})


class ManifestError(Exception):
    """The incoming manifest cannot be trusted. `kind` is 'corrupt' or 'version'."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@record
class Manifest:
    """What luod holds, as the manifest says it across restarts and kexecs."""

    sessions: list[Session]
    kexec_count: int = 0
    name_counter: int = 0
    written_at: float = 0.0
    boot_id: str = ""
    version: int = MANIFEST_VERSION
    # (name, uid) of those who subscribed to updates in that boot: they are
    # told "resumed" when they subscribe again after the kexec. Names are
    # per uid: one name may come with several uids.
    subscribers: set[tuple[str, int]] = dataclasses.field(default_factory=set)
    # Takes whose reply had not gone out (luod.custody), by their number:
    # each the session as it was taken from, with the files taken only,
    # under the name luod's references to them are kept under. A luod
    # restarted in the same boot holds them again; after a kexec they are
    # lost.
    taking: dict[int, Session] = dataclasses.field(default_factory=dict)


def _owner_to_json(o: Owner) -> dict[str, Any]:
    return {"uid": o.uid, "unit": o.unit, "comm": o.comm}


_encode = json.JSONEncoder(separators=(",", ":")).encode
_quote: Callable[[str], str] = json.encoder.encode_basestring_ascii


# Times (luod's clock, seconds) are written to the microsecond, as the API
# says them (luod.varlink.types.usec), up to 2**32 s (the year 2106).
_TIME_LIMIT = float(2**32)


def _usec(t: float) -> float:
    """`t` as the manifest keeps it: to the microsecond."""
    if type(t) is float and 0.0 <= t < _TIME_LIMIT:
        return round(t * 1_000_000) / 1_000_000
    return t


def _time(t: float) -> str:
    """What _encode(_usec(t)) says, without a float's repr: the shortest
    text that reads back as that float costs about 7 K instructions (big
    numbers), as much as the rest of a file's entry, and a hand-off writes
    at least two (its files' time, the record's). Below 2**32 two times
    a microsecond apart are different floats, so the microseconds with no
    trailing zeros are that shortest text."""
    if type(t) is float and 1e-4 <= t < _TIME_LIMIT:  # repr has no exponent there
        whole, micro = divmod(round(t * 1_000_000), 1_000_000)
        return f"{whole}.{micro:06d}".rstrip("0") if micro else f"{whole}.0"
    return _number(_usec(t))


# The last time _file_entry() wrote, as JSON: every file of a hand-off has
# the same.
_last_time: tuple[float, str] = (math.nan, "")


def _file_entry(f: HeldFile) -> str:
    global _last_time
    if f.manifest_entry is None:
        # What _encode() gives for the same dict, without its per-call cost
        # (a hand-off writes one entry per file).
        t = float(f.preserved_at)
        if t != _last_time[0]:
            _last_time = (t, _time(t))
        f.manifest_entry = (
            f'{{"name":{_quote(f.name)},"token":{int(f.token)},'
            f'"size":{int(f.size)},"preserved":{_last_time[1]}}}'
        )
    return f.manifest_entry


def _with_array(head: dict[str, Any], key: str, items: list[str]) -> str:
    """`head` as a JSON object with one more member `key`: an array of items
    that are JSON already."""
    assert head and key not in head
    text = _encode(head)
    return text[:-1] + ',"' + key + '":[' + ",".join(items) + "]}"


def _meta(m: Manifest) -> dict[str, Any]:
    """What the manifest says besides its sessions."""
    return {
        "bootId": m.boot_id,
        "kexecCount": m.kexec_count,
        "nameCounter": m.name_counter,
        "written": _usec(m.written_at),
        "subscribers": [{"name": n, "uid": u} for n, u in sorted(m.subscribers)],
    }


def _number(x: float) -> str:
    """`x` as _encode() says it (a finite float or an int)."""
    if type(x) is float and math.isfinite(x):
        return float.__repr__(x)
    if type(x) is int:
        return int.__repr__(x)
    return _encode(x)


def _meta_json(m: Manifest) -> str:
    """_encode(_meta(m)), put together by hand: every record says it."""
    subscribers = (
        _encode([{"name": n, "uid": u} for n, u in sorted(m.subscribers)])
        if m.subscribers
        else "[]"
    )
    return (
        f'{{"bootId":{_quote(m.boot_id)},"kexecCount":{_number(m.kexec_count)},'
        f'"nameCounter":{_number(m.name_counter)},"written":{_time(m.written_at)},'
        f'"subscribers":{subscribers}}}'
    )


def _takes_json(key: str, takes: Sequence[tuple[int, Session]]) -> str:
    """Takes waiting as a member `key` after others: [[number, session],
    ...]; "" when none (a manifest without any reads as luod before them
    wrote it)."""
    if not takes:
        return ""
    return f',"{key}":[' + ",".join([f"[{int(n)},{_session_json(s)}]" for n, s in takes]) + "]"


def _session_head(s: Session) -> dict[str, Any]:
    return {
        "name": s.name,
        "kind": s.kind.value,
        "kernelName": s.kernel_name,
        # State and deadline matter to a luod restarted in the same
        # boot; after a kexec every session is incoming anyway.
        "state": s.state.value,
        "claimDeadline": None if s.claim_deadline is None else _usec(s.claim_deadline),
        "owner": _owner_to_json(s.owner),
        "created": _usec(s.created_at),
    }


def _session_json(s: Session) -> str:
    """_with_array(_session_head(s), "files", ...), put together by hand."""
    o = s.owner
    unit = "null" if o.unit is None else _quote(o.unit)
    deadline = "null" if s.claim_deadline is None else _time(s.claim_deadline)
    return (
        f'{{"name":{_quote(s.name)},"kind":{_quote(s.kind.value)},'
        f'"kernelName":{_quote(s.kernel_name)},"state":{_quote(s.state.value)},'
        f'"claimDeadline":{deadline},"owner":{{"uid":{_number(o.uid)},"unit":{unit},'
        f'"comm":{_quote(o.comm)}}},"created":{_time(s.created_at)},"files":['
        + ",".join([f.manifest_entry or _file_entry(f) for f in s.files.values()])
        + "]}"
    )


def to_json(m: Manifest) -> bytes:
    doc = {"version": m.version, "generator": "luod", **_meta(m)}
    text = _with_array(doc, "sessions", [_session_json(s) for s in m.sessions])
    return (text[:-1] + _takes_json("taking", sorted(m.taking.items())) + "}").encode()


def change_json(
    m: Manifest,
    put: list[Session],
    gone: list[tuple[int, str]],
    added: Sequence[tuple[Session, Sequence[HeldFile]]] = (),
    took: Sequence[tuple[int, Session]] = (),
    settled: Sequence[int] = (),
) -> bytes:
    """A change of the manifest `m` as one log record (luod.carriers.slots):
    the sessions `put` as they are now, the sessions `gone`, files `added`
    to sessions the manifest names already (just those files: a hand-off
    into a session of many files writes the new ones, not all of them),
    the takes waiting that were recorded (`took`) and settled since the
    record before, and everything but the sessions. Read back by
    from_json() over the base, in that order: del, put, add, took,
    settled."""
    # Put together from JSON texts: a hand-off writes one record per call.
    parts = [
        '{"del":',
        _encode([[uid, name] for uid, name in gone]) if gone else "[]",
        ',"meta":',
        _meta_json(m),
        ',"put":[',
        ",".join([_session_json(s) for s in put]),
        "]",
    ]
    if added:
        parts.append(',"add":[')
        parts.append(
            ",".join(
                [
                    f"[{int(s.owner.uid)},{_quote(s.name)},["
                    + ",".join([f.manifest_entry or _file_entry(f) for f in files])
                    + "]]"
                    for s, files in added
                ]
            )
        )
        parts.append("]")
    parts.append(_takes_json("took", took))
    if settled:
        parts.append(',"settled":' + _encode([int(n) for n in settled]))
    parts.append("}")
    return "".join(parts).encode()


def _get(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise ManifestError("corrupt", f"manifest: {where} has no '{key}'")
    v = d[key]
    # bool is an int in Python; a manifest saying true for a number is corrupt.
    if not isinstance(v, typ) or isinstance(v, bool):
        raise ManifestError("corrupt", f"manifest: {where}.{key} has the wrong type")
    return v


def _file(d: Any) -> HeldFile | None:
    """A file entry as luod writes it, or None for anything else. Reclaim
    reads every file before luod is ready: one type() per field here, not
    _get()'s checks, which were a tenth of a reclaim."""
    if type(d) is not dict or len(d) != 4:
        return None
    name, token, size, preserved = (
        d.get("name"),
        d.get("token"),
        d.get("size"),
        d.get("preserved"),
    )
    if (
        type(name) is not str
        or type(token) is not int
        or type(size) is not int
        or not (type(preserved) is float or type(preserved) is int)
    ):
        return None
    assert isinstance(preserved, float | int)
    return HeldFile(name=name, token=token, size=size, preserved_at=float(preserved))


def _checked_file(d: Any, where: str) -> HeldFile:
    """The same with every check, so that a bad entry is named exactly."""
    if not isinstance(d, dict):
        raise ManifestError("corrupt", f"manifest: {where} is not an object")
    return HeldFile(
        name=_get(d, "name", str, where),
        token=_get(d, "token", int, where),
        size=_get(d, "size", int, where),
        preserved_at=float(_get(d, "preserved", (int, float), where)),
    )


def _load(raw: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError("corrupt", f"{what} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ManifestError("corrupt", f"{what} is not a JSON object")
    return doc


def from_json(raw: bytes, records: Sequence[bytes] = ()) -> Manifest:
    """The manifest of base `raw` with the change `records` applied in order."""
    doc = _load(raw, "manifest")
    version = _get(doc, "version", int, "manifest")
    if version not in READS_VERSIONS:
        raise ManifestError(
            "version",
            f"manifest version {version} is not known to this luod "
            f"(it reads versions {', '.join(map(str, sorted(READS_VERSIONS)))})",
        )
    sessions: dict[tuple[int, str], Session] = {}
    for i, sd in enumerate(_get(doc, "sessions", list, "manifest")):
        s = _session(sd, f"sessions[{i}]")
        if s.key in sessions:
            raise ManifestError(
                "corrupt", f"manifest: session '{s.name}' of uid {s.owner.uid} appears twice"
            )
        sessions[s.key] = s
    taking = _takes(doc, "taking", "manifest")
    meta = doc
    for n, raw_record in enumerate(records):
        where = f"change {n + 1}"
        record = _load(raw_record, f"manifest {where}")
        for j, key in enumerate(_get(record, "del", list, where)):
            if not (isinstance(key, list) and len(key) == 2 and type(key[0]) is int):
                raise ManifestError("corrupt", f"manifest: {where}.del[{j}] is not [uid, name]")
            sessions.pop((key[0], str(key[1])), None)
        for j, sd in enumerate(_get(record, "put", list, where)):
            s = _session(sd, f"{where}.put[{j}]")
            sessions.pop(s.key, None)  # a session put again goes to the end
            sessions[s.key] = s
        for j, add in enumerate(_get(record, "add", list, where) if "add" in record else ()):
            _add_files(sessions, add, f"{where}.add[{j}]")
        taking.update(_takes(record, "took", where))
        for j, number in enumerate(
            _get(record, "settled", list, where) if "settled" in record else ()
        ):
            if type(number) is not int:
                raise ManifestError("corrupt", f"manifest: {where}.settled[{j}] is not a number")
            taking.pop(number, None)
        meta = _get(record, "meta", dict, where)
    return Manifest(
        sessions=list(sessions.values()),
        kexec_count=_get(meta, "kexecCount", int, "manifest"),
        name_counter=_get(meta, "nameCounter", int, "manifest"),
        written_at=float(_get(meta, "written", (int, float), "manifest")),
        boot_id=str(meta.get("bootId", "")),
        subscribers=_subscribers(meta.get("subscribers", [])),
        taking=taking,
    )


def _session(sd: Any, where: str) -> Session:
    if not isinstance(sd, dict):
        raise ManifestError("corrupt", f"manifest: {where} is not an object")
    od = _get(sd, "owner", dict, where)
    unit = od.get("unit")
    if unit is not None and not isinstance(unit, str):
        raise ManifestError("corrupt", f"manifest: {where}.owner.unit has the wrong type")
    try:
        kind = SessionKind(_get(sd, "kind", str, where))
        state = SessionState(sd.get("state", SessionState.OUTGOING.value))
    except ValueError:
        raise ManifestError("corrupt", f"manifest: {where}.kind or .state is unknown") from None
    deadline = sd.get("claimDeadline")
    if deadline is not None and (
        not isinstance(deadline, int | float) or isinstance(deadline, bool)
    ):
        raise ManifestError("corrupt", f"manifest: {where}.claimDeadline has the wrong type")
    s = Session(
        name=_get(sd, "name", str, where),
        kind=kind,
        owner=Owner(
            uid=_get(od, "uid", int, where + ".owner"), unit=unit, comm=str(od.get("comm", ""))
        ),
        kernel_name=_get(sd, "kernelName", str, where),
        created_at=float(_get(sd, "created", (int, float), where)),
        state=state,
        claim_deadline=None if deadline is None else float(deadline),
    )
    tokens: set[int] = set()
    files: dict[str, HeldFile] = {}
    for j, fd_ in enumerate(_get(sd, "files", list, where)):
        f = _file(fd_) or _checked_file(fd_, f"{where}.files[{j}]")
        if f.name in files or f.token in tokens:
            fwhere = f"{where}.files[{j}]"
            raise ManifestError("corrupt", f"manifest: {fwhere} repeats a name or token")
        tokens.add(f.token)
        files[f.name] = f
    s.files = HeldFiles(files)  # counted once, not file by file
    return s


def _add_files(sessions: dict[tuple[int, str], Session], add: Any, where: str) -> None:
    """A record's files added to a session it names: [uid, name, [files]]."""
    if not (
        isinstance(add, list)
        and len(add) == 3
        and type(add[0]) is int
        and type(add[1]) is str
        and isinstance(add[2], list)
    ):
        raise ManifestError("corrupt", f"manifest: {where} is not [uid, name, files]")
    s = sessions.get((add[0], add[1]))
    if s is None:
        raise ManifestError("corrupt", f"manifest: {where} adds to a session it does not name")
    tokens = {f.token for f in s.files.values()}
    files: dict[str, HeldFile] = {}
    for j, fd_ in enumerate(add[2]):
        f = _file(fd_) or _checked_file(fd_, f"{where}.files[{j}]")
        if f.name in s.files or f.name in files or f.token in tokens:
            raise ManifestError("corrupt", f"manifest: {where}.files[{j}] repeats a name or token")
        tokens.add(f.token)
        files[f.name] = f
    s.files.add(list(files.values()))


def _takes(d: dict[str, Any], key: str, where: str) -> dict[int, Session]:
    """Takes waiting, d[key] as _takes_json() wrote it: optional (luod
    before them, and none waiting)."""
    out: dict[int, Session] = {}
    for j, item in enumerate(_get(d, key, list, where) if key in d else ()):
        if not (isinstance(item, list) and len(item) == 2 and type(item[0]) is int):
            raise ManifestError("corrupt", f"manifest: {where}.{key}[{j}] is not [number, session]")
        out[item[0]] = _session(item[1], f"{where}.{key}[{j}]")
    return out


def _subscribers(raw: Any) -> set[tuple[str, int]]:
    """Optional (manifests of luod 0.1 before orchestration lack it)."""
    if not isinstance(raw, list):
        raise ManifestError("corrupt", "manifest: subscribers is not a list")
    out: set[tuple[str, int]] = set()
    for i, d in enumerate(raw):
        if not isinstance(d, dict):
            raise ManifestError("corrupt", f"manifest: subscribers[{i}] is not an object")
        where = f"subscribers[{i}]"
        out.add((_get(d, "name", str, where), _get(d, "uid", int, where)))
    return out
