"""luod's error catalogue: every error a caller can get, each written once.

An entry is a class: the interface whose IDL declares it, its name there
(the class name unless given), its typed parameters (annotated fields, in
constructor order, as a dataclass would take them), the IDL comment (the docstring) and the sentence a
human reads (`sentence`, formatted from the parameters). luod's layers raise
the entries as exceptions (`raise errors.NoSuchSession(session)`); the
varlink layer (luod.varlink.replies) derives its error replies and the IDL
`error` lines from them, and clients say them with `describe`. A field made
with `local()` goes to luod's log only, never to the caller: a refused user
is not told who owns what it asked for.

To add an error: a class in its interface's section below (the IDL lists
them in this order), raise it, `make idl`. Its reply, its IDL line and its
sentence in luoctl follow; tests/unit/test_errors.py checks that they do.
No varlink here: luod.client imports this, and services import the client.
"""

from __future__ import annotations

import errno
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

from luod.interfaces import CUSTODY, MANAGER


class _Local:
    """What `local()` returns: marks a field as luod's log only."""

    __slots__ = ()


_LOCAL = _Local()
_REQUIRED = object()


def local() -> Any:
    """A field for luod's log only: not a parameter of the varlink error."""
    return _LOCAL


CATALOGUE: dict[str, type[LuodError]] = {}
"""Every error, by its full varlink name, in the order the IDL lists them."""


# Not dataclasses: each @dataclass compiles an __init__ and a __repr__ of
# its own, and with the `dataclasses` module (which imports `inspect`) that
# was a third of what luoctl imports and half a varlink round trip's worth of
# luod's start. One __init__ for all entries does the same work.
@typing.dataclass_transform(eq_default=False, field_specifiers=(local,))
class LuodError(Exception):
    """Base of the catalogue. A subclass names its interface (and its varlink
    name when it is not the class name) and annotates its fields, which are
    its constructor's parameters in order, as a dataclass's would be."""

    interface: ClassVar[str]
    varlink_name: ClassVar[str]
    error_name: ClassVar[str]
    sentence: ClassVar[str]
    # Every field in constructor order, with its default (_REQUIRED: none).
    field_defaults: ClassVar[dict[str, Any]]
    # The fields that are the varlink error's parameters, in order; and
    # those that are for luod's log only.
    wire_names: ClassVar[tuple[str, ...]]
    local_names: ClassVar[tuple[str, ...]]

    def __init_subclass__(cls, *, interface: str, name: str | None = None, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.interface = interface
        cls.varlink_name = name or cls.__name__
        cls.error_name = f"{interface}.{cls.varlink_name}"
        defaults: dict[str, Any] = {}
        wire: list[str] = []
        local_: list[str] = []
        for field in cls.__annotations__:
            default = cls.__dict__.get(field, _REQUIRED)
            if default is _LOCAL:
                local_.append(field)
                default = _REQUIRED
                delattr(cls, field)
            else:
                wire.append(field)
            defaults[field] = default
        cls.field_defaults = defaults
        cls.wire_names = tuple(wire)
        cls.local_names = tuple(local_)
        if cls.error_name in CATALOGUE:
            raise TypeError(f"{cls.error_name} is in the catalogue twice")
        CATALOGUE[cls.error_name] = cls

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # As a dataclass's __init__: positional in field order, then by name.
        fields = self.field_defaults
        if len(args) > len(fields):
            raise TypeError(f"{type(self).__name__}() takes {len(fields)} arguments")
        for field, value in zip(fields, args, strict=False):
            if field in kwargs:
                raise TypeError(f"{type(self).__name__}() got {field!r} twice")
            kwargs[field] = value
        for field, default in fields.items():
            value = kwargs.pop(field, default)
            if value is _REQUIRED:
                raise TypeError(f"{type(self).__name__}() missing argument {field!r}")
            setattr(self, field, value)
        if kwargs:
            raise TypeError(f"{type(self).__name__}() got unexpected {sorted(kwargs)}")

    def __repr__(self) -> str:
        shown = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.field_defaults)
        return f"{type(self).__name__}({shown})"

    @property
    def parameters(self) -> dict[str, Any]:
        """The varlink error's parameters (None: optional and absent)."""
        return {name: getattr(self, name) for name in self.wire_names}

    @property
    def context(self) -> dict[str, Any]:
        """The `local()` fields: for luod's log."""
        return {name: getattr(self, name) for name in self.local_names}

    def __str__(self) -> str:
        return self.sentence.format_map(self.parameters)


# --- io.luod.Custody -----------------------------------------------------------


class NoSuchSession(LuodError, interface=CUSTODY):
    """The caller (or, for root, owner) holds no session of that name in
    luod's custody. Another user's sessions are never found by name."""

    sentence = "no session named '{session}'"
    session: str


class NoSuchFd(LuodError, interface=CUSTODY):
    """The session holds no fd of that name."""

    sentence = "session '{session}' holds no fd named '{name}'"
    session: str
    name: str


class SessionExists(LuodError, interface=CUSTODY):
    """A session of that name exists already."""

    sentence = "a session named '{session}' exists already"
    session: str


class FdNameExists(LuodError, interface=CUSTODY):
    """The session holds an fd of that name already."""

    sentence = "session '{session}' holds an fd named '{name}' already"
    session: str
    name: str


class InvalidName(LuodError, interface=CUSTODY):
    """A session or fd name breaks the naming rules; reason says which."""

    sentence = "invalid {parameter}: {reason}"
    parameter: str
    # The caller knows what it sent; the log says it.
    value: str = local()
    reason: str


class ReservedSessionName(LuodError, interface=CUSTODY):
    """The session name belongs to PID 1 ('systemd') or to luod ('luod*')."""

    sentence = "session name '{session}' is reserved: {reason}"
    session: str
    reason: str


class UnsupportedFd(LuodError, interface=CUSTODY):
    """The kernel cannot carry this kind of file over a kexec; kind names it."""

    sentence = "{parameter}: {reason}"
    parameter: str
    kind: str
    reason: str


class MissingFd(LuodError, interface=CUSTODY):
    """A file descriptor index names no fd sent with the call."""

    sentence = "{parameter}: no file descriptor with index {index} came with the call"
    parameter: str
    index: int


class TooManyOpenFiles(LuodError, interface=CUSTODY):
    """The fd was sent, but luod is at its limit of open files (limit), so
    the kernel dropped it on the way in; nothing of the call was kept."""

    sentence = (
        "{parameter}: file descriptor {index} was dropped on the way in: "
        "luod is at its limit of {limit} open files"
    )
    parameter: str
    index: int
    limit: int


class AlreadyPreserved(LuodError, interface=CUSTODY):
    """The file is in luod's custody already, under another name."""

    sentence = "{parameter}: this file is held already as '{name}' in session '{session}'"
    parameter: str
    session: str
    name: str


class PermissionDenied(LuodError, interface=CUSTODY):
    """Only root may name another user's sessions (owner); session names are
    per user, so without owner a call only ever reaches the caller's own."""

    sentence = "session '{session}': only root may act on another user's sessions (owner)"
    session: str
    # Whose sessions were asked for (uid N); the caller knows.
    owner: str = local()


class WrongSessionKind(LuodError, interface=CUSTODY):
    """The operation does not apply to this kind of session."""

    sentence = "session '{session}' ({kind}): {reason}"
    session: str
    kind: str
    reason: str


class KernelRefused(LuodError, interface=CUSTODY):
    """The kernel refused an operation; errno and message say why."""

    sentence = "the kernel refused {operation}: {message}"
    operation: str
    errno: int
    message: str
    session: str | None = None


class NotReady(LuodError, interface=CUSTODY):
    """luod cannot do this now; reason says why."""

    sentence = "{reason}"
    reason: str


# The errnos of a full fd table: luod's own (EMFILE, its LimitNOFILE=) or
# the system's (ENFILE, fs.file-max).
FD_TABLE_FULL = (errno.EMFILE, errno.ENFILE)


def fd_table_full(err: int, what: str) -> NotReady:
    """`what` was not done for want of an fd (`err` one of FD_TABLE_FULL):
    a state of luod's that passes as fds are closed, not the kernel's no."""
    # Here, not at the top: luoctl imports this module, and never this.
    import resource

    if err == errno.ENFILE:
        where = "the system is at its limit of open files (fs.file-max)"
    else:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        where = f"luod is at its limit of {limit} open files (LimitNOFILE=)"
    return NotReady(f"{where}: {what}; try again once it holds fewer")


def kernel_refused(operation: str, err: int, message: str, session: str) -> LuodError:
    """The kernel's refusal of `operation` as the caller is told it: with a
    full fd table it had no fd to give luod (the device's, a session's)."""
    if err in FD_TABLE_FULL:
        if operation == "create_session":
            return fd_table_full(err, f"session '{session}' not created")
        return fd_table_full(err, f"{operation} for session '{session}' not done")
    return KernelRefused(operation, err, message, session)


class QuotaExceeded(LuodError, interface=CUSTODY):
    """The caller's uid holds as much of resource (sessions, files, bytes) as
    luod allows it (limit, luod's options); nothing was changed."""

    sentence = (
        "quota exceeded: at most {limit} {resource} per user; "
        "release some (DiscardSession, RetrieveFd take) or ask for a larger quota"
    )
    resource: str
    limit: int


class CustodyFull(LuodError, interface=CUSTODY):
    """luod holds as much of resource, for many uids together, as it may
    (limit: for the caller; option: luod's option that sets it): all uids'
    sessions and files (a share of luod's open-file limit, a part of which
    only root may use), or the bytes pinned by every uid but root. Nothing
    was changed."""

    sentence = (
        "luod holds as many {resource} as it may ({limit}); nothing was changed: "
        "release some (DiscardSession, RetrieveFd take), or ask for a larger {option}"
    )
    resource: str
    limit: int
    option: str


class TooManyFds(LuodError, interface=CUSTODY):
    """The call would return count fds, more than one reply carries (limit,
    SCM_MAX_FD); nothing was handed out. Name the files, at most limit per
    call."""

    sentence = (
        "session '{session}': {count} fds asked for, at most {limit} fit one reply; "
        "name them (names), at most {limit} per call"
    )
    session: str
    count: int
    limit: int


# --- io.luod.Manager -----------------------------------------------------------


class PreflightFailed(LuodError, interface=MANAGER):
    """The preflight check found problems; the kexec was not started."""

    sentence = "preflight check failed ({problems} problems): {reason}"
    problems: int
    reason: str


class RootRequired(LuodError, interface=MANAGER):
    """Only root may call this method."""

    sentence = "{method} needs root"
    method: str


class KernelUnusable(LuodError, interface=MANAGER):
    """The kernel image (or initrd) cannot be loaded; reason says why."""

    sentence = "cannot load {parameter}: {reason}"
    parameter: str
    reason: str


class InvalidDeadline(LuodError, interface=MANAGER):
    """The deadline is not more than 0 and at most maximum seconds."""

    sentence = "{parameter} must be more than 0 and at most {maximum} seconds"
    parameter: str
    maximum: int


class SubscriberInvalidName(LuodError, interface=MANAGER, name="InvalidName"):
    """A subscriber name breaks the naming rules (those of a session name:
    it is logged, listed and carried over the kexec); reason says which."""

    sentence = "invalid {parameter}: {reason}"
    parameter: str
    # The caller knows what it sent; the log says it.
    value: str = local()
    reason: str


class SubscriptionExists(LuodError, interface=MANAGER):
    """The caller has a subscriber of that name connected already (names
    are per uid: another user's subscribers do not count)."""

    sentence = "a subscriber named '{name}' is connected already"
    name: str


class SubscriptionQuotaExceeded(LuodError, interface=MANAGER, name="QuotaExceeded"):
    """The caller's uid holds as many of resource as luod allows it (limit,
    luod's options); nothing was changed."""

    sentence = (
        "quota exceeded: at most {limit} {resource} per user; "
        "end one (close its Subscribe call) or ask for a larger quota"
    )
    resource: str
    limit: int


class NoSuchSubscription(LuodError, interface=MANAGER):
    """No subscription with that id (of the caller's)."""

    sentence = "no subscription '{subscription}'"
    subscription: str


class SubscriptionPermissionDenied(LuodError, interface=MANAGER, name="PermissionDenied"):
    """The subscription belongs to another user; only its owner or root
    may acknowledge for it."""

    sentence = "subscription '{subscription}' belongs to another user"
    subscription: str
    owner: str = local()


class UnexpectedAcknowledge(LuodError, interface=MANAGER):
    """The acknowledgement does not answer an event this subscription is waiting on."""

    sentence = "acknowledge of {phase} for update {update}: {reason}"
    subscription: str
    update: int
    phase: str
    reason: str


class UpdateInProgress(LuodError, interface=MANAGER):
    """Another update is running."""

    sentence = "update {update} is running"
    update: int


class UpdateAborted(LuodError, interface=MANAGER):
    """A subscriber that may stop updates (root's, or of a uid luod's
    --update-veto names) refused, missed its deadline or went away, and the
    update was not forced; nothing was dropped."""

    sentence = "update {update} aborted: {subscriber}: {reason}; nothing was dropped"
    update: int
    subscriber: str
    reason: str


class SubscriptionEnded(LuodError, interface=MANAGER):
    """The subscription was ended by luod (it is stopping)."""

    sentence = "{reason}"
    reason: str


def of_interface(interface: str) -> tuple[type[LuodError], ...]:
    """The errors an interface declares, in catalogue order."""
    return tuple(e for e in CATALOGUE.values() if e.interface == interface)


# Not luod's: the varlink service interface's own errors, as luod's callers
# meet them.
_VARLINK_SENTENCES = {
    "org.varlink.service.InvalidParameter": "invalid parameter {parameter}",
    "org.varlink.service.MethodNotFound": "luod does not know the method {method} (too old?)",
    "org.varlink.service.InterfaceNotFound": "luod does not serve the interface {interface}",
}


def describe(error: str, parameters: Mapping[str, Any]) -> str:
    """One sentence for a varlink error reply, as a client received it."""
    entry = CATALOGUE.get(error)
    template = entry.sentence if entry is not None else _VARLINK_SENTENCES.get(error)
    if template is not None:
        try:
            return template.format_map(parameters)
        except (KeyError, IndexError, ValueError):
            pass
    return f"{error} {dict(parameters)}" if parameters else error
