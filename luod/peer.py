"""Who is on the other end of a varlink connection.

The uid comes from SO_PEERCRED (the kernel's word, not the client's). The
systemd unit comes from the peer's cgroup; it outlives the pid across a kexec
and is what a service is known by after it, so luod records it as metadata.
Access is decided by uid alone: units are not a security boundary between
processes of one uid.
"""

from __future__ import annotations

import os
import re
import socket
import struct

from luod.record import record

_UNIT = re.compile(r"/([^/]+\.(?:service|scope|socket|mount|slice))$")


@record(frozen=True)
class Peer:
    """Who is at the other end of a connection (SO_PEERCRED, and its unit)."""

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
    return unit_of_cgroup(_read(f"/proc/{pid}/cgroup"))


def unit_of_cgroup(text: str) -> str | None:
    """The unit in /proc/PID/cgroup's text ("0::/system.slice/x.service/sub")."""
    for line in text.splitlines():
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


SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5; Python 3.11 lacks the name


def _pidfd_pid(pidfd: int) -> int:
    """The pid a pidfd refers to now: -1 once that process is gone."""
    for line in _read(f"/proc/self/fdinfo/{pidfd}").splitlines():
        if line.startswith("Pid:"):
            return int(line.split()[1])
    return -1


def peer_of_socket(sock: socket.socket) -> Peer:
    """uid and pid from SO_PEERCRED; unit and comm from /proc/PID. The pid
    alone could be reused between connect() and the read of /proc, so where
    the kernel offers SO_PEERPIDFD the /proc facts are only kept if the
    pidfd still names that same, living process after they were read."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    if pid <= 0:
        return Peer(pid=pid, uid=uid, gid=gid)
    try:
        pidfd = struct.unpack("i", sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
    except OSError:
        pidfd = -1
    try:
        comm = _read(f"/proc/{pid}/comm").strip()
        unit = unit_of_pid(pid)
        if pidfd >= 0 and _pidfd_pid(pidfd) != pid:
            comm, unit = "", None  # the peer is gone; its pid may be someone else's now
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    return Peer(pid=pid, uid=uid, gid=gid, unit=unit, comm=comm)


def self_peer() -> Peer:
    pid = os.getpid()
    return Peer(pid=pid, uid=os.getuid(), gid=os.getgid(), unit=unit_of_pid(pid), comm="luod")
