"""The varlink error replies, made from luod's error catalogue.

For each entry of luod.errors this makes the asyncvarlink
TypedVarlinkErrorReply class that is served (same full name, the wire
parameters with their types, the docstring as the IDL comment), and each
interface declares `replies_of(ITS_NAME)`: so every error luod can raise is
a reply and an IDL `error` line, with nothing to keep in step by hand.
`refused` turns a raised catalogue error into its reply and logs it.

A reply class is made when it is first needed: when a call is refused
with it, or when its interface's IDL is rendered. Making all of them (a
TypedDict and a converter each, in asyncvarlink) was 15.7 M of the 384 M
instructions of luod's start on Python 3.14 (issue 12, goal 2), for
replies that a call which succeeds never sends.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Callable, Sequence

from asyncvarlink import TypedVarlinkErrorReply

from luod import errors
from luod.log import get_logger, shown
from luod.varlink import transport

log = get_logger()


@functools.cache
def _wire_type(annotation: str) -> typing.Any:
    """A field annotation of the catalogue (a string there, PEP 563) as the
    type asyncvarlink reads. Not typing.get_type_hints(): that evaluates
    every annotation up the exception classes' MRO again for each of the
    catalogue's entries, a third of this module's cost at luod's start."""
    return eval(annotation, vars(errors))


# The reply classes made so far, by catalogue entry.
MADE: dict[type[errors.LuodError], type[TypedVarlinkErrorReply]] = {}


def reply_class(error: type[errors.LuodError]) -> type[TypedVarlinkErrorReply]:
    """The reply class of a catalogue entry, made at its first use; the same
    class from then on, so a refused call's reply is an instance of the
    class its interface declares."""
    made = MADE.get(error)
    if made is None:
        made = MADE[error] = _reply_class(error)
    return made


def _reply_class(error: type[errors.LuodError]) -> type[TypedVarlinkErrorReply]:
    hints = error.__annotations__
    annotations = {}
    for name in error.wire_names:
        hint = hints[name]
        annotations[name] = _wire_type(hint) if isinstance(hint, str) else hint
    parameters = type("Parameters", (), {"__annotations__": annotations})

    def body(ns: dict[str, typing.Any]) -> None:
        ns.update(__doc__=error.__doc__, __module__=__name__, Parameters=parameters)

    made = types.new_class(
        error.__name__, (TypedVarlinkErrorReply,), {"name": error.error_name}, body
    )
    return typing.cast(type[TypedVarlinkErrorReply], made)


class Replies(Sequence[type[TypedVarlinkErrorReply]]):
    """An interface's error replies, made when the sequence is first read."""

    def __init__(self, interface: str) -> None:
        self.interface = interface

    @functools.cached_property
    def _made(self) -> tuple[type[TypedVarlinkErrorReply], ...]:
        return tuple(reply_class(e) for e in errors.of_interface(self.interface))

    @typing.overload
    def __getitem__(self, index: int) -> type[TypedVarlinkErrorReply]: ...
    @typing.overload
    def __getitem__(self, index: slice) -> Sequence[type[TypedVarlinkErrorReply]]: ...
    def __getitem__(
        self, index: int | slice
    ) -> type[TypedVarlinkErrorReply] | Sequence[type[TypedVarlinkErrorReply]]:
        return self._made[index]

    def __len__(self) -> int:
        return len(self._made)


def replies_of(interface: str) -> Replies:
    """An interface's `errors`: the replies of its catalogue entries, made
    when first read (transport.declaring_errors says when that is)."""
    return Replies(interface)


def reply(e: errors.LuodError) -> TypedVarlinkErrorReply:
    """The reply for `e`: its wire parameters (an absent optional one is left out)."""
    return reply_class(type(e))(**{k: v for k, v in e.parameters.items() if v is not None})


# Long enough for a preflight refusal that names many sessions.
LOGGED_MAX = 2048


def refused(method: str, e: errors.LuodError) -> TypedVarlinkErrorReply:
    """Log a refused call and make its reply."""
    # The sentence and the log-only fields carry what the caller sent
    # (names, paths), cut so that a refusal cannot flood the log.
    context = {k: shown(v, LOGGED_MAX) if isinstance(v, str) else v for k, v in e.context.items()}
    log.info(
        "call-refused",
        method=method,
        error=e.error_name,
        detail=shown(str(e), LOGGED_MAX),
        peer=transport.current().peer.describe(),
        **context,
    )
    return reply(e)


_P = typing.ParamSpec("_P")
_R = typing.TypeVar("_R")


def translating(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Serve catalogue errors raised by a (synchronous) method as their replies."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except errors.LuodError as e:
            raise refused(fn.__name__, e) from None

    return wrapper
