"""luod.varlink.limits.text_depth reads from a message's text what depth()
below finds walking the parsed object (decode_message checks the nesting
with it; it walked the object before)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from luod.varlink.limits import MAX_DEPTH, ProtocolViolation, decode_message, text_depth


def depth(obj: Any) -> int:
    """How deep arrays and objects nest in `obj`, walked (without recursion)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            return level  # deep enough to refuse; no need to walk on
        stack.extend((child, level + 1) for child in children)
    return deepest


LEAVES: list[Any] = [
    1,
    'a[b{"]}',
    "x\\",
    '\\"[',
    None,
    True,
    2.5,
    "é]",
    "\n{",
    "",
    "[",
    "}",
    '\\\\"',
]
KEYS = ["k", "[", "\\", '"{', "", '}\\"']


def _nested(rng: random.Random, levels: int) -> Any:
    """`levels` deep along one spine, with shallow siblings on the way."""
    if levels == 0:
        return rng.choice(LEAVES)
    inner = _nested(rng, levels - 1)
    siblings = [rng.choice(LEAVES) for _ in range(rng.randint(0, 2))]
    if rng.random() < 0.5:
        items = [*siblings, inner, rng.choice([[], {}, [1], {"[": "]"}])]
        rng.shuffle(items)
        return items
    keys = [rng.choice(KEYS) + str(i) for i in range(len(siblings) + 1)]
    return dict(zip(keys, [*siblings, inner], strict=True))


def test_text_depth_is_depth() -> None:
    rng = random.Random(12)
    for _ in range(600):
        obj = _nested(rng, rng.randint(0, MAX_DEPTH + 10))
        data = json.dumps(obj, ensure_ascii=rng.random() < 0.5).encode()
        assert min(text_depth(data), MAX_DEPTH + 1) == min(depth(obj), MAX_DEPTH + 1), data


@pytest.mark.parametrize(
    ("obj", "want"),
    [
        ({}, 1),
        ([[], [[]]], 3),
        ({"[[[": "]]]", "x": [{"y": "{{{"}]}, 3),
        (["\\", "[", "\\\\", '"]'], 1),
        ({"files": [{"name": f"f{i}", "fileDescriptor": i} for i in range(250)]}, 3),
    ],
)
def test_text_depth_cases(obj: Any, want: int) -> None:
    assert text_depth(json.dumps(obj).encode()) == depth(obj) == want


def test_a_message_nested_too_deep_is_refused_and_a_wide_one_is_not() -> None:
    deep = b'{"a":' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}"
    with pytest.raises(ProtocolViolation):
        decode_message(deep)
    wide = json.dumps({"files": [{"name": "[" * 70, "i": [1]} for _ in range(300)]}).encode()
    assert len(decode_message(wide)["files"]) == 300
