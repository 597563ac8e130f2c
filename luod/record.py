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
written once is as fast), but is made when the class is first
instantiated (`_init_on_first_use`): luod's start makes few of its records.

A frozen record is made as a mutable dataclass, with a shared
`__setattr__` and `__delattr__` in place of the two that dataclasses would
compile for each frozen class: 14.7 M instructions of luod's start on
Python 3.11, 10.4 M on 3.14. Making an instance costs about 2 K
instructions more (a call of the shared `__setattr__` per field; no frozen
record is made per fd). The shared `__setattr__` lets a field be
set once, when the instance has no value for it yet: that is the generated
`__init__` setting it (every field of a frozen record is set there; `_make`
refuses one that is not). After that it refuses as dataclasses' own does:
any name on an instance of the record itself, a field on an instance of a
subclass. The one difference: dataclasses' `__dataclass_params__.frozen` is
False, so a plain `dataclasses.dataclass(frozen=True)` cannot derive from
a frozen record (a frozen record can).
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
# A frozen record's class (its subclasses inherit the attribute: theirs is
# not them) and the names of its fields.
_FROZEN_CLASS = "_record_frozen_class"
_FROZEN_FIELDS = "_record_frozen_fields"


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


def _frozen_setattr(self: object, name: str, value: object) -> None:
    own = self.__dict__
    cls = type(self)
    fields = getattr(cls, _FROZEN_FIELDS)
    if name not in own and name in fields:
        # __init__ setting the field (a record's fields are plain instance
        # attributes: no descriptor to go through).
        own[name] = value
    elif cls is getattr(cls, _FROZEN_CLASS) or name in fields:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
    else:
        object.__setattr__(self, name, value)


def _frozen_delattr(self: object, name: str) -> None:
    cls = type(self)
    if cls is getattr(cls, _FROZEN_CLASS) or name in getattr(cls, _FROZEN_FIELDS):
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")
    object.__delattr__(self, name)


def _takes_initvar(cls: typing.Any, fields: tuple[dataclasses.Field[typing.Any], ...]) -> bool:
    """Whether a pseudo-field of `cls` (one fields() leaves out: a ClassVar
    or an InitVar) is an InitVar, as an object or as a string."""
    real = {f.name for f in fields}
    for name, f in cls.__dataclass_fields__.items():
        t = f.type
        if name not in real and (
            isinstance(t, dataclasses.InitVar)
            or t is dataclasses.InitVar
            or (isinstance(t, str) and "InitVar" in t)
        ):
            return True
    return False


def _check_order(cls: type, fields: tuple[dataclasses.Field[typing.Any], ...]) -> None:
    """dataclasses' check of the __init__ it would write, made when the
    class is made: a positional field without a default after one with."""
    seen_default = False
    for f in fields:
        if not f.init or f.kw_only:
            continue
        has_default = (
            f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        )
        if has_default:
            seen_default = True
        elif seen_default:
            raise TypeError(f"non-default argument {f.name!r} follows default argument")


def _init_on_first_use(cls: typing.Any) -> Callable[..., None]:
    """An `__init__` that puts dataclasses' own in its place when the class
    is first instantiated, and runs it. Python 3.11 compiles each generated
    `__init__` from source, about 0.5 M instructions, and luod's start makes
    few of its 40 records (issue 12, goal 2). dataclasses writes it for a
    twin of the class with the same fields (copies: dataclasses sets their
    name and type): it sets the fields of any instance given as self, and
    calls its `__post_init__`."""

    def __init__(self: object, *args: object, **kwargs: object) -> None:
        fields = [
            (
                f.name,
                f.type,
                dataclasses.field(
                    default=f.default,
                    default_factory=f.default_factory,
                    init=f.init,
                    kw_only=f.kw_only,
                ),
            )
            for f in dataclasses.fields(cls)
        ]
        # A docstring: dataclasses would make one from the twin's signature.
        namespace: dict[str, object] = {"__doc__": cls.__doc__ or cls.__name__}
        if hasattr(cls, "__post_init__"):
            namespace["__post_init__"] = cls.__post_init__
        twin: typing.Any = dataclasses.make_dataclass(
            cls.__name__, fields, namespace=namespace, repr=False, eq=False, match_args=False
        )
        init = twin.__dict__["__init__"]
        init.__qualname__ = f"{cls.__qualname__}.__init__"
        cls.__init__ = init
        init(self, *args, **kwargs)

    return __init__


def _make(cls: type[_T], frozen: bool) -> type[_T]:
    # dataclasses' own rule, which it cannot check here: it sees every
    # record as mutable.
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base) and hasattr(base, _FROZEN_CLASS) != frozen:
            raise TypeError(
                "cannot inherit frozen record from a non-frozen one"
                if frozen
                else "cannot inherit non-frozen record from a frozen one"
            )
    own_init = "__init__" in cls.__dict__
    made: typing.Any = dataclasses.dataclass(cls, init=False, repr=False, eq=False)
    fields = dataclasses.fields(made)
    if _takes_initvar(made, fields):
        # The __init__ made when first needed is made from fields(), which
        # leaves InitVars out.
        raise TypeError(f"record {made.__qualname__}: InitVar fields are not supported")
    _check_order(made, fields)
    if not own_init:
        made.__init__ = _init_on_first_use(made)
    if frozen:
        # dataclasses' __init__ sets an init=False field only from a default
        # factory (a plain default stays on the class): a field it leaves
        # unset would let the first assignment after it through.
        unset = [f.name for f in fields if not f.init and f.default_factory is dataclasses.MISSING]
        if unset:
            raise TypeError(
                f"frozen record {made.__qualname__}: field {unset[0]} is init=False "
                "without a default_factory (set every field in __init__)"
            )
        setattr(made, _FROZEN_CLASS, made)
        setattr(made, _FROZEN_FIELDS, frozenset(f.name for f in fields))
        made.__setattr__ = _frozen_setattr
        made.__delattr__ = _frozen_delattr
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
