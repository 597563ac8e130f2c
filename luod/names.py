"""Naming rules: which session and fd names luod accepts, which it keeps for
itself, and how it names the kernel sessions it creates.

A client's session name is luod's handle for it, unique per owner (uid);
the kernel session behind it gets a name of luod's own
(`kernel_session_name`), unique in the kernel and across kexecs,
so that a name used again after a kexec never meets the session it named
before. Refusals are raised as catalogue errors naming the offending
parameter.
"""

from __future__ import annotations

import re

from luod import errors
from luod.kernel import uapi
from luod.log import shown as shown_in_log

MAX_SESSION_NAME = 48
# The kernel's own limit: the most an adopted session's name can have.
MAX_KERNEL_SESSION_NAME = uapi.MAX_SESSION_NAME
MAX_FD_NAME = 255
# Session names luod will not create or adopt: PID 1 owns 'systemd' (its fd
# store carrier), luod owns everything starting with 'luod'.
RESERVED_EXACT = frozenset({"systemd"})
RESERVED_PREFIX = "luod"
# Matched whole (fullmatch): "$" would let a trailing newline through.
_SESSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:+=-]*")
# A valid systemd fd name (no ':' which separates LISTEN_FDNAMES), so a name
# can be handed on to a service's fd store unchanged.
_FD_NAME = re.compile(r"[A-Za-z0-9_.@+=,-]+")


def _session_name_problem(name: str, limit: int) -> str | None:
    """What is wrong with `name` as a session name, if anything (reserved
    names aside)."""
    if not name:
        return "must not be empty"
    # surrogatepass: a JSON escape of a lone surrogate (ud800) decodes to
    # a str that strict UTF-8 cannot encode; the pattern below refuses it.
    if len(name) > limit or len(name.encode(errors="surrogatepass")) > limit:
        return f"longer than {limit} bytes"
    if not _SESSION_NAME.fullmatch(name):
        return "must start with a letter or digit and use only letters, digits and _.@:+=-"
    return None


def check_session_name(
    name: str, parameter: str = "session", limit: int = MAX_SESSION_NAME
) -> None:
    problem = _session_name_problem(name, limit)
    if problem is not None:
        raise errors.InvalidName(parameter, shown_in_log(name), problem)
    if name in RESERVED_EXACT:
        raise errors.ReservedSessionName(
            name, "PID 1 uses it for the fd stores it carries over kexec"
        )
    if name.startswith(RESERVED_PREFIX):
        raise errors.ReservedSessionName(name, "names starting with 'luod' are luod's own")


def check_subscriber_name(name: str, parameter: str = "name") -> None:
    """A subscriber's name follows the rules of a session name (none is
    reserved): it is logged, listed in GetStatus and carried in the
    manifest over the kexec."""
    problem = _session_name_problem(name, MAX_SESSION_NAME)
    if problem is not None:
        raise errors.SubscriberInvalidName(parameter, shown_in_log(name), problem)


def check_fd_name(name: str, parameter: str = "name") -> None:
    if len(name) <= MAX_FD_NAME and _FD_NAME.fullmatch(name):
        return  # the common case first: a hand-off checks every name
    shown = shown_in_log(name)
    if not name:
        raise errors.InvalidName(parameter, shown, "must not be empty")
    if len(name) > MAX_FD_NAME:
        raise errors.InvalidName(parameter, shown, f"longer than {MAX_FD_NAME} characters")
    if not _FD_NAME.fullmatch(name):
        raise errors.InvalidName(
            parameter, shown, "must use only letters, digits and _.@+=,- (a valid fd name)"
        )


def kernel_session_name(counter: int, uid: int, name: str) -> str:
    """The kernel's name for the `counter`th session luod creates, for the
    session `name` of `uid`: reserved for luod, cut to the kernel's limit
    of 63 bytes (session names are ASCII, so characters are bytes). Kernel
    session names are global while luod's are per owner: the counter
    (never reused, carried in the manifest) makes the name unique, and it
    and the uid always fit (at most 38 bytes), so only the client's name
    is ever cut; the uid is there for whoever reads the kernel's names."""
    return f"{RESERVED_PREFIX}.{counter}.u{uid}.{name}"[:MAX_KERNEL_SESSION_NAME]
