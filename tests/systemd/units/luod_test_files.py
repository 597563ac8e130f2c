#!/usr/bin/python3
"""Test-only client of tests/systemd (installed by vm/build-image.sh
--test-units as /usr/lib/luod-test/luod_test_files.py): memfds of known
bytes handed to luod and retrieved again, many in one Python start. Runs on
the guest's python3 with the image's luod and testsupport.

    luod_test_files.py put OUT.json SESSION/NAME:SIZE:POS ...
        For each: a memfd of SIZE bytes seeded by SESSION/NAME, its file
        position at POS, handed to luod (PreserveFd, createSession). OUT
        gets {key: {"expected": facts, "ok": bool, "error": ...}}, written
        before each call too (the call may be the one luod dies in).
        Exit status 1 if any hand-off failed.
    luod_test_files.py get OUT.json EXPECT.json ...
        A copy (RetrieveFd) of every key of the EXPECT files (put's OUT),
        one after the other on one connection, right away: OUT gets
        {key: facts or {"error": name, "message": ...}}, the seconds
        since the first call, then luod's GetStatus and ListSessions (on
        the same connection: one Python start less under TCG). Exit status
        1 unless every copy came back byte-identical (sha256 and size) to
        what was handed over (a file that is gone, too).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from luod.client import VarlinkError, connect
from testsupport.guest import describe, seeded_memfd


def _dump(path: str, data: Any) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def put(out_path: str, specs: list[str]) -> int:
    out: dict[str, Any] = {}
    failed = 0
    for spec in specs:
        key, size, pos = spec.split(":")
        session, name = key.split("/")
        fd = seeded_memfd(int(size), key, position=int(pos))
        entry: dict[str, Any] = {"expected": describe(fd), "ok": False}
        out[key] = entry
        _dump(out_path, out)
        try:
            with connect() as c:
                c.preserve_fd(session, name, fd, create_session=True)
            entry["ok"] = True
        except (VarlinkError, OSError, EOFError) as e:
            entry["error"] = f"{type(e).__name__}: {e}"
            failed += 1
        finally:
            os.close(fd)
        _dump(out_path, out)
    print(json.dumps(out))
    return 1 if failed else 0


def get(out_path: str, expect_paths: list[str]) -> int:
    expected: dict[str, Any] = {}
    for path in expect_paths:
        with open(path) as f:
            expected.update(json.load(f))
    got: dict[str, Any] = {}
    t0 = time.monotonic()
    with connect() as c:
        for key in expected:
            session, name = key.split("/")
            try:
                fd = c.retrieve_fd(session, name)
            except VarlinkError as e:
                got[key] = {"error": e.error, "message": str(e)}
                continue
            got[key] = describe(fd)
            os.close(fd)
        seconds = time.monotonic() - t0
        status = c.status()
        sessions = c.list_sessions()
    identical = all(
        "error" not in got[k]
        and (got[k]["sha256"], got[k]["size"]) == (e["expected"]["sha256"], e["expected"]["size"])
        for k, e in expected.items()
    )
    _dump(
        out_path,
        {
            "files": got,
            "seconds": seconds,
            "identical": identical,
            "status": status,
            "sessions": sessions,
        },
    )
    print(json.dumps({"identical": identical, "seconds": seconds}))
    return 0 if identical else 1


def main() -> int:
    cmd, out, *rest = sys.argv[1:]
    if cmd == "put":
        return put(out, rest)
    if cmd == "get":
        return get(out, rest)
    print(f"unknown command {cmd!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
