"""luod.record makes dataclasses that say, compare and hash as
dataclasses' own would: each check below makes the same class both ways
and compares what they do."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import types
import typing

import pytest

from luod.record import record

# Class bodies as (annotations, namespace): no field, one, several, with
# defaults, a default factory, and fields left out of repr and compare.
SHAPES: dict[str, tuple[dict[str, object], dict[str, object]]] = {
    "empty": ({}, {}),
    "one": ({"a": int}, {}),
    "several": ({"a": int, "b": str, "c": "list[int] | None"}, {"c": None}),
    "factory": ({"a": int, "b": list}, {"b": dataclasses.field(default_factory=list)}),
    "hidden": (
        {"a": int, "b": int, "c": int},
        {
            "b": dataclasses.field(default=0, repr=False),
            "c": dataclasses.field(default=0, compare=False),
        },
    ),
    "hash-only": (
        {"a": int, "b": int},
        {"b": dataclasses.field(default=0, compare=False, hash=True)},
    ),
}

# Values to make each shape with, by position, and one that differs in each field.
VALUES: dict[str, tuple[object, ...]] = {
    "empty": (),
    "one": (1,),
    "several": (1, "x'y", [2, 3]),
    "factory": (1, [2]),
    "hidden": (1, 2, 3),
    "hash-only": (1, 2),
}


def _both(shape: str, frozen: bool) -> tuple[type[typing.Any], type[typing.Any]]:
    annotations, namespace = SHAPES[shape]

    def body(ns: dict[str, object]) -> None:
        ns.update(namespace, __annotations__=dict(annotations), __qualname__="Shape")

    ours: type[typing.Any] = record(frozen=frozen)(types.new_class("Shape", (), {}, body))
    theirs: type[typing.Any] = dataclasses.dataclass(frozen=frozen)(
        types.new_class("Shape", (), {}, body)
    )
    return ours, theirs


def _variants(shape: str) -> list[tuple[object, ...]]:
    """The values, then each field changed alone."""
    base = VALUES[shape]
    out = [base]
    for i, v in enumerate(base):
        changed = [2] if isinstance(v, list) else v + "z" if isinstance(v, str) else 7
        out.append((*base[:i], changed, *base[i + 1 :]))
    return out


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_says_and_compares_as_dataclasses(shape: str, frozen: bool) -> None:
    ours, theirs = _both(shape, frozen)
    assert [f.name for f in dataclasses.fields(ours)] == [
        f.name for f in dataclasses.fields(theirs)
    ]
    variants = _variants(shape)
    for left in variants:
        assert repr(ours(*left)) == repr(theirs(*left))
        for right in variants:
            assert (ours(*left) == ours(*right)) == (theirs(*left) == theirs(*right)), (left, right)
            assert (ours(*left) != ours(*right)) == (theirs(*left) != theirs(*right)), (left, right)


@pytest.mark.parametrize("shape", SHAPES)
def test_frozen_hashes_as_dataclasses(shape: str) -> None:
    ours, theirs = _both(shape, frozen=True)
    for values in _variants(shape):
        if not any(isinstance(v, list) for v in values):
            assert hash(ours(*values)) == hash(theirs(*values))
    # Equal records are one key, a field left out of compare and hash aside.
    if shape == "hidden":
        assert len({ours(1, 2, 3), ours(1, 2, 4)}) == 1


@pytest.mark.parametrize("shape", SHAPES)
def test_mutable_is_unhashable(shape: str) -> None:
    ours, theirs = _both(shape, frozen=False)
    for cls in (ours, theirs):
        with pytest.raises(TypeError, match="unhashable"):
            hash(cls(*VALUES[shape]))


def test_only_the_same_class_is_equal() -> None:
    ours, _ = _both("one", frozen=False)
    other, _ = _both("one", frozen=False)
    assert ours(1) != other(1)
    assert ours(1) != (1,)
    assert ours(1).__eq__((1,)) is NotImplemented


def test_frozen_refuses_assignment() -> None:
    ours, _ = _both("one", frozen=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ours(1).a = 2


def _outcome(action: typing.Callable[..., object], *args: object) -> str:
    try:
        action(*args)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "done"


@pytest.mark.parametrize("subclass", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_frozen_refuses_as_dataclasses(shape: str, subclass: bool) -> None:
    """Setting and deleting each field and a name that is none, on an
    instance of the record and of a (plain) subclass: what dataclasses'
    compiled __setattr__/__delattr__ do, the shared ones do."""
    ours, theirs = _both(shape, frozen=True)
    if subclass:
        ours, theirs = type("Sub", (ours,), {}), type("Sub", (theirs,), {})
    names = [f.name for f in dataclasses.fields(ours)] + ["other"]
    for name in names:
        made = ours(*VALUES[shape]), theirs(*VALUES[shape])
        for action, *value in ((setattr, 5), (setattr, 6), (delattr,), (delattr,)):
            got = [_outcome(action, obj, name, *value) for obj in made]
            assert got[0] == got[1], (name, got)
        assert vars(made[0]) == vars(made[1])
    made = ours(*VALUES[shape]), theirs(*VALUES[shape])
    assert [vars(copy.copy(m)) for m in made] == [vars(m) for m in made]
    assert [vars(copy.deepcopy(m)) for m in made] == [vars(m) for m in made]
    assert dataclasses.replace(made[0]) == made[0]


def test_frozen_and_mutable_records_do_not_derive_from_each_other() -> None:
    @record(frozen=True)
    class Frozen:
        a: int

    @record
    class Mutable:
        a: int

    with pytest.raises(TypeError, match="cannot inherit non-frozen record from a frozen one"):
        record(type("M", (Frozen,), {"__annotations__": {"b": int}}))
    with pytest.raises(TypeError, match="cannot inherit frozen record from a non-frozen one"):
        record(frozen=True)(type("F", (Mutable,), {"__annotations__": {"b": int}}))

    @record(frozen=True)
    class More(Frozen):
        b: int = 0

    more = More(1, 2)
    assert more == More(1, 2) and hash(more) == hash(More(1, 2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(more, "b", 3)  # noqa: B010 - past the type checker, which knows


def test_frozen_fields_are_all_set_by_init() -> None:
    # A field __init__ leaves unset could be assigned once afterwards.
    with pytest.raises(TypeError, match="field b is init=False without a default_factory"):

        @record(frozen=True)
        class Unset:
            a: int
            b: int = dataclasses.field(init=False)

    # dataclasses' __init__ leaves a plain default on the class.
    with pytest.raises(TypeError, match="field b is init=False without a default_factory"):

        @record(frozen=True)
        class OnTheClass:
            a: int
            b: int = dataclasses.field(default=0, init=False)

    @record(frozen=True)
    class Set:
        a: int
        b: list[int] = dataclasses.field(init=False, default_factory=list)

    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(Set(1), "b", [2])  # noqa: B010 - past the type checker, which knows


def test_is_a_dataclass() -> None:
    ours, _ = _both("several", frozen=True)
    made = ours(1, "x")
    assert dataclasses.is_dataclass(made) and not isinstance(made, type)
    assert dataclasses.asdict(made) == {"a": 1, "b": "x", "c": None}
    assert dataclasses.replace(made, b="y") == ours(1, "y")


def test_without_parentheses() -> None:
    @record
    class Point:
        x: int
        y: int = 0

    assert repr(Point(1)) == "test_without_parentheses.<locals>.Point(x=1, y=0)"
    assert Point(1) == Point(1, 0)
    assert Point.__hash__ is None


# Calls of __init__, each made on a fresh class both ways (the first call
# is the one that puts dataclasses' __init__ in place).
INIT_CALLS: list[tuple[str, tuple[object, ...], dict[str, object]]] = [
    ("several", (1, "x"), {}),
    ("several", (1,), {"b": "x", "c": [4]}),
    ("several", (), {"a": 1, "b": "x"}),
    ("several", (1,), {}),
    ("several", (1, "x", None, 4), {}),
    ("several", (1, "x"), {"d": 5}),
    ("several", (1, "x"), {"a": 2}),
    ("factory", (1,), {}),
    ("hidden", (1,), {"c": 3}),
    ("empty", (), {}),
    ("empty", (1,), {}),
]


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize(("shape", "args", "kwargs"), INIT_CALLS)
def test_init_made_on_first_use_does_as_dataclasses(
    shape: str, args: tuple[object, ...], kwargs: dict[str, object], frozen: bool
) -> None:
    """Each call on a class not instantiated before, then the same call
    again: the same fields set, or the same error."""
    ours, theirs = _both(shape, frozen)
    for _ in range(2):
        got = []
        for cls in (ours, theirs):
            try:
                got.append(repr(vars(cls(*args, **kwargs))))
            except TypeError as e:
                got.append(f"TypeError: {e}".replace(cls.__qualname__ + ".", ""))
        assert got[0] == got[1]
    assert str(inspect.signature(ours)) == str(inspect.signature(theirs))


def test_init_is_made_when_first_needed() -> None:
    @record
    class Later:
        a: int

    stub = Later.__init__
    Later(1)
    assert Later.__init__ is not stub
    assert (
        Later.__init__.__qualname__ == "test_init_is_made_when_first_needed.<locals>.Later.__init__"
    )
    made = Later.__init__
    Later(2)
    assert Later.__init__ is made


def test_init_made_on_first_use_keeps_the_rest_of_dataclasses_init() -> None:
    seen: list[str] = []

    @record(frozen=True)
    class Base:
        a: int
        fresh: list[int] = dataclasses.field(default_factory=list)
        later: list[int] = dataclasses.field(default_factory=lambda: [9], init=False)

        def __post_init__(self) -> None:
            seen.append(type(self).__name__)

    @record(frozen=True)
    class Derived(Base):
        b: int = 0
        c: int = dataclasses.field(default=0, kw_only=True)

    class Plain(Base):
        pass

    # A plain subclass made first puts Base's __init__ in place for both.
    assert vars(Plain(1)) == {"a": 1, "fresh": [], "later": [9]}
    one, two = Base(1), Base(1)
    assert one.fresh is not two.fresh
    # (luod's records declare no field specifiers: mypy knows no init=False.)
    derived: typing.Any = Derived
    assert vars(derived(1, [2], 3, c=4)) == {"a": 1, "fresh": [2], "later": [9], "b": 3, "c": 4}
    with pytest.raises(TypeError):
        derived(1, [2], 3, 4)
    assert seen == ["Plain", "Base", "Base", "Derived"]


def test_own_init_is_kept() -> None:
    @record
    class Own:
        a: int

        def __init__(self, text: str) -> None:
            self.a = int(text)

    assert Own("3") == Own("3") and Own("3").a == 3


def test_init_checks_are_made_with_the_class() -> None:
    # What dataclasses refuses when it writes __init__ is refused when the
    # class is made, not at its first instance.
    with pytest.raises(TypeError, match="non-default argument 'b' follows default argument"):
        record(type("Order", (), {"__annotations__": {"a": int, "b": int}, "a": 0}))
    with pytest.raises(TypeError, match="InitVar fields are not supported"):
        record(type("Init", (), {"__annotations__": {"a": dataclasses.InitVar[int]}}))
    with pytest.raises(TypeError, match="InitVar fields are not supported"):
        record(type("Init", (), {"__annotations__": {"a": "dataclasses.InitVar[int]"}}))
