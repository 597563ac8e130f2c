"""Names shared by luod's server and its clients.

The full contract is the IDL in protocol/*.varlink; this module only holds
what a client needs without importing the server: interface names, the
default socket, and how to say each error in a sentence.
"""

from __future__ import annotations

from typing import Any

DEFAULT_SOCKET = "/run/luod/io.luod"
CUSTODY = "io.luod.Custody"
MANAGER = "io.luod.Manager"


def _q(v: Any) -> str:
    return f"'{v}'"


_TEMPLATES: dict[str, str] = {
    f"{CUSTODY}.NoSuchSession": "no session named {session}",
    f"{CUSTODY}.NoSuchFd": "session {session} holds no fd named {name}",
    f"{CUSTODY}.SessionExists": "a session named {session} exists already",
    f"{CUSTODY}.FdNameExists": "session {session} holds an fd named {name} already",
    f"{CUSTODY}.InvalidName": "invalid {parameter}: {reason}",
    f"{CUSTODY}.ReservedSessionName": "session name {session} is reserved: {reason}",
    f"{CUSTODY}.UnsupportedFd": "{parameter}: {reason}",
    f"{CUSTODY}.MissingFd": "{parameter}: no file descriptor with index {index} came with the call",
    f"{CUSTODY}.TooManyOpenFiles": "{parameter}: file descriptor {index} was dropped on the way in: luod is at its limit of {limit} open files",
    f"{CUSTODY}.AlreadyPreserved": "{parameter}: this file is held already as {name} in session {session}",
    f"{CUSTODY}.PermissionDenied": "session {session} belongs to another user",
    f"{CUSTODY}.WrongSessionKind": "session {session} ({kind}): {reason}",
    f"{CUSTODY}.KernelRefused": "the kernel refused {operation}: {message}",
    f"{CUSTODY}.NotReady": "{reason}",
    f"{MANAGER}.PreflightFailed": "preflight check failed ({problems} problems): {reason}",
    f"{MANAGER}.RootRequired": "{method} needs root",
    f"{MANAGER}.KernelUnusable": "cannot load {parameter}: {reason}",
    f"{MANAGER}.InvalidDeadline": "{parameter} must be more than 0 and at most {maximum} seconds",
    f"{MANAGER}.SubscriptionExists": "a subscriber named {name} is connected already",
    f"{MANAGER}.NoSuchSubscription": "no subscription {subscription}",
    f"{MANAGER}.UnexpectedAcknowledge": "acknowledge of {phase} for update {update}: {reason}",
    f"{MANAGER}.UpdateInProgress": "update {update} is running",
    f"{MANAGER}.UpdateAborted": "update {update} aborted: {subscriber}: {reason}; nothing was dropped",
    f"{MANAGER}.SubscriptionEnded": "{reason}",
    "org.varlink.service.InvalidParameter": "invalid parameter {parameter}",
    "org.varlink.service.MethodNotFound": "luod does not know the method {method} (too old?)",
    "org.varlink.service.InterfaceNotFound": "luod does not serve the interface {interface}",
}

_QUOTED = {"session", "name"}


def describe_error(error: str, parameters: dict[str, Any]) -> str:
    """One sentence for a varlink error reply."""
    template = _TEMPLATES.get(error)
    if template is None:
        return f"{error} {parameters}" if parameters else error
    values = {k: (_q(v) if k in _QUOTED else v) for k, v in parameters.items()}
    try:
        return template.format(**values)
    except KeyError:
        return f"{error} {parameters}"
