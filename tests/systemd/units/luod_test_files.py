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
    luod_test_files.py take-unread OUT.json SESSION/NAME
        Takes SESSION/NAME (RetrieveFd, take) on a connection that reads
        nothing: 60 replies before it fill the socket, and the take's reply
        waits in luod. Once luod lists the file no more, luod.service is
        killed (SIGKILL), and the connection closed only after luod's main
        process is gone: what luod does for a reply it could not send never
        runs. OUT gets {"taken": bool, "killed": PID}. Exit status 1 unless
        the file was taken and luod killed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from luod.client import VarlinkError, connect
from luod.interfaces import DEFAULT_SOCKET
from testsupport.guest import describe, seeded_memfd, take_unread


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


def _listed(session: str, name: str) -> bool:
    with connect() as c:
        return any(
            f["name"] == name for s in c.list_sessions() if s["name"] == session for f in s["files"]
        )


def take_unread_and_kill(out_path: str, key: str) -> int:
    session, name = key.split("/")
    result: dict[str, Any] = {"taken": False, "killed": 0}
    with take_unread(os.environ.get("LUOD_SOCKET", DEFAULT_SOCKET), session, name):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not result["taken"]:
            result["taken"] = not _listed(session, name)
            time.sleep(0.2)
        if result["taken"]:
            pid = int(
                subprocess.run(
                    ["systemctl", "show", "-P", "MainPID", "luod.service"],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
            )
            subprocess.run(["systemctl", "kill", "--signal=KILL", "luod.service"], check=True)
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.05)
            result["killed"] = 0 if os.path.exists(f"/proc/{pid}") else pid
    _dump(out_path, result)
    print(json.dumps(result))
    return 0 if result["taken"] and result["killed"] else 1


def main() -> int:
    cmd, out, *rest = sys.argv[1:]
    if cmd == "put":
        return put(out, rest)
    if cmd == "get":
        return get(out, rest)
    if cmd == "take-unread":
        return take_unread_and_kill(out, rest[0])
    print(f"unknown command {cmd!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
