"""Whether the service manager carries luod's fd store over a kexec.

$FDSTORE says that the service has an fd store, not that PID 1 keeps it
across a kexec: FileDescriptorStorePreserve=yes exists since systemd 254,
but only 261 and later carry the store over a kexec (as a LUO client of its
own). Under 254..260 the store is closed when PID 1 execs systemd-shutdown,
which unpreserves every session in it. luod asks PID 1 for its version over
its varlink socket (org.varlink.service.GetInfo; the socket exists since
systemd 257) and reports what it cannot rely on as a preflight problem.
"""

from __future__ import annotations

import json
import re
import socket

MANAGER_SOCKET = "/run/systemd/io.systemd.Manager"
# The first systemd that carries fd stores (FileDescriptorStorePreserve=yes)
# over a kexec.
CARRIES_FDSTORE_OVER_KEXEC = 261
_REPLY_MAX = 64 * 1024


class ManagerUnknown(Exception):
    """The service manager's version could not be found out."""


def manager_version(path: str = MANAGER_SOCKET, timeout: float = 5.0) -> str:
    """The version the service manager at `path` reports, e.g. '262.1-1'."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
            s.sendall(json.dumps({"method": "org.varlink.service.GetInfo"}).encode() + b"\0")
            reply = b""
            while not reply.endswith(b"\0"):
                chunk = s.recv(4096)
                if not chunk:
                    raise ManagerUnknown(f"{path}: closed before answering GetInfo")
                reply += chunk
                if len(reply) > _REPLY_MAX:
                    raise ManagerUnknown(f"{path}: GetInfo answer longer than {_REPLY_MAX} bytes")
        except OSError as e:
            raise ManagerUnknown(f"{path}: {e.strerror or e}") from None
    try:
        message = json.loads(reply[:-1])
        version = message["parameters"]["version"]
    except (ValueError, KeyError, TypeError):
        raise ManagerUnknown(f"{path}: GetInfo answered {reply[:200]!r}") from None
    if not isinstance(version, str):
        raise ManagerUnknown(f"{path}: GetInfo answered version {version!r}")
    return version


def fdstore_kexec_problem(path: str = MANAGER_SOCKET) -> tuple[str | None, str]:
    """(why a kexec would lose luod's fd store, or None; what was found)."""
    try:
        version = manager_version(path)
    except ManagerUnknown as e:
        return (
            f"cannot tell whether the service manager carries luod's fd store over a kexec "
            f"(systemd >= {CARRIES_FDSTORE_OVER_KEXEC} does; older ones have no {path}): {e}",
            "unknown",
        )
    m = re.match(r"\d+", version)
    if m is None:
        return (f"the service manager reports version '{version}', not systemd's", version)
    if int(m.group()) < CARRIES_FDSTORE_OVER_KEXEC:
        return (
            f"the service manager is systemd {version}, which closes luod's fd store before a "
            f"kexec (systemd >= {CARRIES_FDSTORE_OVER_KEXEC} carries it): every session would be "
            "lost",
            version,
        )
    return (None, version)
