"""luod.record makes dataclasses that say, compare and hash as
dataclasses' own would: each check below makes the same class both ways
and compares what they do."""

from __future__ import annotations

import dataclasses
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
