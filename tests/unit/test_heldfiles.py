"""luod.model.HeldFiles: a session's bytes counted as files come and go,
so that a quota check does not sum every file on every hand-off."""

from __future__ import annotations

import pytest

from luod.model import HeldFile, HeldFiles, Owner, Session, SessionKind


def _f(name: str, size: int) -> HeldFile:
    return HeldFile(name, 1, size, 0.0)


def test_bytes_follow_every_change() -> None:
    files = HeldFiles({"a": _f("a", 10)})
    files["b"] = _f("b", 5)
    files["a"] = _f("a", 1)  # the same name again: the old one no longer counts
    assert files.size == 6 == sum(f.size for f in files.values())
    del files["b"]
    assert files.size == 1
    with pytest.raises(KeyError):
        del files["b"]
    assert files.size == 1


@pytest.mark.parametrize(
    "mutation",
    [
        lambda d: d.pop("a"),
        lambda d: d.popitem(),
        lambda d: d.clear(),
        lambda d: d.update(b=_f("b", 1)),
        lambda d: d.setdefault("b", _f("b", 1)),
    ],
)
def test_mutations_that_would_miscount_are_refused(mutation: object) -> None:
    files = HeldFiles({"a": _f("a", 10)})
    with pytest.raises(TypeError, match="counts bytes"):
        mutation(files)  # type: ignore[operator]
    assert files.size == 10 and list(files) == ["a"]


def test_session_counts_what_it_is_given() -> None:
    given = {"a": _f("a", 3), "b": _f("b", 4)}
    s = Session("s", SessionKind.MANAGED, Owner(0), "luod.1.s", 0.0, files=given)  # type: ignore[arg-type]
    assert type(s.files) is HeldFiles and s.bytes_pinned == 7
    s.files["c"] = _f("c", 1)
    del s.files["a"]
    assert s.bytes_pinned == 5


def test_add_counts_files_at_once_and_recounts_a_name_held_already() -> None:
    files = HeldFiles({"a": _f("a", 10)})
    files.add([_f("b", 1), _f("c", 2)])
    assert files.size == 13 and list(files) == ["a", "b", "c"]
    files.add([_f("a", 4), _f("d", 8)])  # "a" again: replaced, and counted again
    assert files.size == 15 == sum(f.size for f in files.values())
