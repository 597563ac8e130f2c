#!/usr/bin/python3
"""Guest helper of bench/systemd.py (issue 12, goal 7): the varlink
transport's cost, one stdlib client against two servers.

    varlinkping.py --info FILE [--calls 200] [--warmup 20] NAME=SOCKET...

One connection per server (plain AF_UNIX stream socket, JSON + NUL framing,
nothing of luod imported); `warmup` calls of org.varlink.service.GetInfo on
each, then `calls` rounds in which each server gets one call, the order
alternating from round to round so that neither always goes first. Each call
is timed from send to its whole reply (CLOCK_MONOTONIC). Writes the median,
quartiles and min per server to FILE (JSON).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from typing import Any

from testsupport.guest import write_json

GETINFO = json.dumps({"method": "org.varlink.service.GetInfo"}).encode() + b"\0"


class Conn:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""

    def call(self) -> dict[str, Any]:
        self.sock.sendall(GETINFO)
        while b"\0" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.buf += chunk
        reply, _, self.buf = self.buf.partition(b"\0")
        message: dict[str, Any] = json.loads(reply)
        if "error" in message:
            raise RuntimeError(f"GetInfo failed: {message}")
        return message

    def timed(self) -> float:
        t = time.perf_counter()
        self.call()
        return time.perf_counter() - t


def summary(samples: list[float]) -> dict[str, Any]:
    q = statistics.quantiles(samples, n=4)
    return {
        "calls": len(samples),
        "median": statistics.median(samples),
        "q1": q[0],
        "q3": q[2],
        "min": min(samples),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--info", required=True)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("servers", nargs="+", help="NAME=SOCKET")
    args = p.parse_args()
    conns = {}
    out: dict[str, Any] = {"calls": args.calls, "warmup": args.warmup, "servers": {}}
    for spec in args.servers:
        name, _, path = spec.partition("=")
        conns[name] = Conn(path)
        info = conns[name].call()["parameters"]
        out["servers"][name] = {
            "socket": path,
            "vendor": info.get("vendor"),
            "product": info.get("product"),
            "version": info.get("version"),
        }
    for _ in range(args.warmup):
        for c in conns.values():
            c.call()
    samples: dict[str, list[float]] = {name: [] for name in conns}
    order = list(conns)
    for i in range(args.calls):
        for name in order if i % 2 == 0 else reversed(order):
            samples[name].append(conns[name].timed())
    for name, values in samples.items():
        out["servers"][name].update(summary(values))
    write_json(args.info, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
