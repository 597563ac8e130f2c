"""The error catalogue (luod.errors): every error luod can raise is served
by name, declared in the IDL, and said to a human in its sentence."""

from __future__ import annotations

import ast
import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest
from asyncvarlink import VarlinkInterface

from luod import errors
from luod.client import Client, VarlinkError
from luod.interfaces import CUSTODY, MANAGER
from luod.varlink.custody import CustodyInterface
from luod.varlink.manager import ManagerInterface
from luod.varlink.replies import reply, reply_class
from testsupport.luodproc import LuodProcess
from testsupport.util import run_as

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL = ROOT / "protocol"
ENTRIES = list(errors.CATALOGUE.values())


def sample(cls: type[errors.LuodError]) -> errors.LuodError:
    """An instance with a distinct value for every field."""
    hints = typing.get_type_hints(cls)
    values = {name: 7 if hints[name] is int else f"<{name}>" for name in cls.field_defaults}
    return cls(**values)


def raised_in_luod() -> set[str]:
    """Every `errors.X(...)` called anywhere under luod/."""
    found: set[str] = set()
    for path in (ROOT / "luod").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "errors"
                and node.func.attr[:1].isupper()
            ):
                found.add(node.func.attr)
    return found


def test_what_luod_raises_is_in_the_catalogue() -> None:
    raised = raised_in_luod()
    assert len(raised) > 15, raised  # the scan sees the raises
    for name in raised:
        cls = getattr(errors, name, None)
        assert isinstance(cls, type) and cls in ENTRIES, f"errors.{name} is not in the catalogue"


@pytest.mark.parametrize("cls", ENTRIES, ids=lambda c: c.error_name)
def test_every_error_is_served_and_declared(cls: type[errors.LuodError]) -> None:
    interfaces: dict[str, type[VarlinkInterface]] = {
        CUSTODY: CustodyInterface,
        MANAGER: ManagerInterface,
    }
    interface = interfaces[cls.interface]
    served = reply_class(cls)
    assert served in interface.errors
    assert served.name == cls.error_name
    assert cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(")  # an IDL comment
    idl = (PROTOCOL / f"{cls.interface}.varlink").read_text()
    assert f"\nerror {cls.varlink_name} {served.paramtype.as_varlink}\n" in idl


def test_every_idl_error_is_in_the_catalogue() -> None:
    declared = {
        f"{path.stem}.{m}"
        for path in PROTOCOL.glob("*.varlink")
        for m in re.findall(r"^error (\w+) ", path.read_text(), re.M)
    }
    assert declared == set(errors.CATALOGUE)


@pytest.mark.parametrize("cls", ENTRIES, ids=lambda c: c.error_name)
def test_the_client_says_each_error_in_its_sentence(cls: type[errors.LuodError]) -> None:
    e = sample(cls)
    wire = json.loads(json.dumps(reply(e).tojson()))
    got = VarlinkError(wire["error"], wire.get("parameters") or {})
    assert (got.error, got.short) == (cls.error_name, cls.varlink_name)
    assert str(got) == str(e) == cls.sentence.format_map(e.parameters)
    assert cls.error_name not in str(got) and "{" not in str(got)
    # What is only for luod's log does not reach the caller.
    for value in e.context.values():
        assert value not in json.dumps(wire)


def test_constructors_take_what_luod_passes() -> None:
    assert errors.NoSuchSession("s").parameters == {"session": "s"}
    assert errors.NotReady("why").parameters == {"reason": "why"}
    assert errors.KernelUnusable("kernel", "bad").parameters == {
        "parameter": "kernel",
        "reason": "bad",
    }
    e = errors.InvalidName("session", "a b", "bad character")
    assert (e.parameters, e.context) == (
        {"parameter": "session", "reason": "bad character"},
        {"value": "a b"},
    )
    e2 = errors.PermissionDenied("s", "uid 1000")
    assert (e2.parameters, e2.context) == ({"session": "s"}, {"owner": "uid 1000"})
    assert errors.KernelRefused("preserve_fd", 12, "no memory").session is None
    assert errors.KernelRefused("preserve_fd", 12, "no memory", "s").session == "s"


def test_unknown_errors_are_said_as_they_came() -> None:
    assert str(VarlinkError("org.example.Odd", {"x": 1})) == "org.example.Odd {'x': 1}"
    assert str(VarlinkError("org.example.Odd", {})) == "org.example.Odd"
    # A catalogue error missing a parameter its sentence needs.
    assert str(VarlinkError(f"{CUSTODY}.NoSuchFd", {"session": "s"})).startswith(CUSTODY)
    assert str(VarlinkError("org.varlink.service.MethodNotFound", {"method": "X"})) == (
        "luod does not know the method X (too old?)"
    )


def _acknowledge(path: str, subscription: str) -> dict[str, Any]:
    got: dict[str, Any] = {}
    with Client(path) as c:
        try:
            c.acknowledge(subscription, 1, "prepare")
            got["error"] = None
        except VarlinkError as e:
            got = {"error": e.error, "parameters": e.parameters, "message": str(e)}
    return got


def test_foreign_acknowledge_is_refused_by_name(luod: LuodProcess) -> None:
    """Served path: uid 65534 acknowledging root's subscription gets
    io.luod.Manager.PermissionDenied (it used to be InternalServerError)."""
    with luod.client() as subscriber:
        first = next(iter(subscriber.subscribe("roots")))
        sid = first["subscription"]
        got = run_as(65534, lambda: _acknowledge(luod.socket, sid))
        assert got == {
            "error": f"{MANAGER}.PermissionDenied",
            "parameters": {"subscription": sid},
            "message": f"subscription '{sid}' belongs to another user",
        }
        # Root's own acknowledge of that subscription is not denied.
        with luod.client() as c, pytest.raises(VarlinkError) as e:
            c.acknowledge(sid, 1, "prepare")
        assert e.value.short == "UnexpectedAcknowledge"
