"""The names a client of luod needs: its varlink interfaces and its socket.

Kept apart from the varlink layer so that a service handing fds to luod
(luod.client) imports neither asyncvarlink nor the server. The contract
itself is the IDL in protocol/*.varlink, rendered from luod.varlink.
"""

from __future__ import annotations

DEFAULT_SOCKET = "/run/luod/io.luod"
CUSTODY = "io.luod.Custody"
MANAGER = "io.luod.Manager"
