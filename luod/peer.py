"""Who is on the other end of a varlink connection.

The uid comes from SO_PEERCRED (the kernel's word, not the client's). The
systemd unit comes from the peer's cgroup; it outlives the pid across a kexec
and is what a service is known by after it, so luod records it as metadata.
Access is decided by uid alone: units are not a security boundary between
processes of one uid.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import struct

_UNIT = re.compile(r"/([^/]+\.(?:service|scope|socket|mount|slice))$")


@dataclasses.dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    unit: str | None = None
    comm: str = ""

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def describe(self) -> str:
        who = self.unit or self.comm or f"pid {self.pid}"
        return f"{who} (uid {self.uid})"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def unit_of_pid(pid: int) -> str | None:
    """The systemd unit a process runs in, from its cgroup v2 path."""
    for line in _read(f"/proc/{pid}/cgroup").splitlines():
        hierarchy, _, path = line.partition("::")
        if hierarchy != "0":
            continue
        # Walk up: a service may put processes into sub-cgroups of its own.
        while path and path != "/":
            m = _UNIT.search(path)
            if m:
                unit = m.group(1)
                # A unit's slice is not the unit: skip slices, keep walking up.
                if not unit.endswith(".slice"):
                    return unit
            path = path.rsplit("/", 1)[0]
    return None


def peer_of_socket(sock: socket.socket) -> Peer:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    comm = _read(f"/proc/{pid}/comm").strip() if pid > 0 else ""
    return Peer(pid=pid, uid=uid, gid=gid, unit=unit_of_pid(pid) if pid > 0 else None, comm=comm)


def self_peer() -> Peer:
    pid = os.getpid()
    return Peer(pid=pid, uid=os.getuid(), gid=os.getgid(), unit=unit_of_pid(pid), comm="luod")
