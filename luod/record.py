"""luod's records: dataclasses whose repr, equality and hash are written once.

`dataclasses` writes each class's `__init__`, `__repr__`, `__eq__` (and,
frozen, `__setattr__`, `__delattr__` and `__hash__`) as source text and
compiles it when the class is made: at every start of luod, since no .pyc
holds it. That compiling was close to half of what luod's own modules cost
at start (79 M instructions of 181 M, Python 3.11). `record` makes a real
dataclass (fields(), replace(), asdict() and asyncvarlink read it as any
other) but without the generated `__repr__` and `__eq__`: every record
shares the three functions below, which read the class's field names, taken
once when the class is made. They say and compare what dataclasses' would:
`Name(field=value, ...)` over the fields with repr=True, equality of the
fields with compare=True between instances of the same class only, and for
a frozen record a hash of the fields it compares (a mutable one has none).
The generated `__init__` stays (it runs for every instance, and nothing
written once is as fast), and so do a frozen record's generated
`__setattr__` and `__delattr__`: its `__init__` assigns its fields past
them, which a shared `__setattr__` could not tell from any other assignment.
"""

from __future__ import annotations

import dataclasses
import operator
import typing
from collections.abc import Callable

_T = typing.TypeVar("_T")

# What a record class holds beside its fields: the names `__repr__` shows,
# and getters of the values it shows, compares and hashes (each a tuple).
_SHOWN = "_record_shown"
_SHOWN_VALUES = "_record_shown_values"
_COMPARED = "_record_compared"
_HASHED = "_record_hashed"


def _values(names: tuple[str, ...]) -> Callable[[object], tuple[object, ...]]:
    if not names:
        return lambda _: ()
    if len(names) == 1:
        # attrgetter of one name gives the value itself, not a 1-tuple.
        (name,) = names
        return lambda obj: (getattr(obj, name),)
    return typing.cast(Callable[[object], tuple[object, ...]], operator.attrgetter(*names))


def _repr(self: object) -> str:
    cls = type(self)
    shown = zip(getattr(cls, _SHOWN), getattr(cls, _SHOWN_VALUES)(self), strict=True)
    return f"{cls.__qualname__}({', '.join(f'{n}={v!r}' for n, v in shown)})"


def _eq(self: object, other: object) -> object:
    if other.__class__ is not self.__class__:
        return NotImplemented
    compared = getattr(self.__class__, _COMPARED)
    return compared(self) == compared(other)


def _hash(self: object) -> int:
    return hash(getattr(type(self), _HASHED)(self))


def _make(cls: type[_T], frozen: bool) -> type[_T]:
    made: typing.Any = dataclasses.dataclass(cls, repr=False, eq=False, frozen=frozen)
    fields = dataclasses.fields(made)
    shown = tuple(f.name for f in fields if f.repr)
    setattr(made, _SHOWN, shown)
    setattr(made, _SHOWN_VALUES, _values(shown))
    setattr(made, _COMPARED, _values(tuple(f.name for f in fields if f.compare)))
    hashed = tuple(f.name for f in fields if (f.compare if f.hash is None else f.hash))
    setattr(made, _HASHED, _values(hashed))
    made.__repr__ = _repr
    made.__eq__ = _eq
    # As dataclasses' eq=True: a frozen record hashes what it compares; a
    # mutable one is unhashable.
    made.__hash__ = _hash if frozen else None
    return typing.cast(type[_T], made)


@typing.overload
def record(cls: type[_T], /) -> type[_T]: ...
@typing.overload
def record(*, frozen: bool = False) -> Callable[[type[_T]], type[_T]]: ...


@typing.dataclass_transform()
def record(cls: type[_T] | None = None, /, *, frozen: bool = False) -> typing.Any:
    """`@dataclasses.dataclass`, or `(frozen=True)`, with the shared repr/eq/hash."""
    if cls is None:
        return lambda cls: _make(cls, frozen)
    return _make(cls, frozen)
