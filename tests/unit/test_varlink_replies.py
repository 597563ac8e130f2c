"""luod.varlink.replies: how the server turns a raised catalogue error into
the error reply it sends, and what it logs about it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any, cast

import pytest
from asyncvarlink import TypedVarlinkErrorReply
from structlog.testing import capture_logs

from luod import errors
from luod.interfaces import CUSTODY, MANAGER
from luod.orchestrator import Orchestrator, Phase
from luod.peer import Peer
from luod.varlink import transport
from luod.varlink.custody import CustodyInterface
from luod.varlink.manager import ManagerInterface
from luod.varlink.replies import refused, replies_of, reply, reply_class, translating
from testsupport.util import fresh_python

ROOT = Peer(pid=1, uid=0, gid=0, comm="luoctl")
NOBODY = Peer(pid=2, uid=65534, gid=65534, comm="intruder")


@contextlib.contextmanager
def calling_as(peer: Peer) -> Iterator[None]:
    """Serve as if `peer` made the current call."""
    ctx = transport.CallContext(peer, None, cast(transport.LuodProtocol, None))
    token = transport._current.set(ctx)
    try:
        yield
    finally:
        transport._current.reset(token)


def test_a_reply_class_per_catalogue_entry_declared_by_its_interface() -> None:
    for interface in (CUSTODY, MANAGER):
        names = [r.name for r in replies_of(interface)]
        assert names == [e.error_name for e in errors.of_interface(interface)]
        assert all(n.startswith(interface + ".") for n in names)
    served = {r for i in (CustodyInterface, ManagerInterface) for r in i.errors}
    assert served == {reply_class(e) for e in errors.CATALOGUE.values()}


def test_reply_classes_are_made_when_first_needed_not_at_luods_start() -> None:
    """Issue 12, goal 2: making the catalogue's reply classes was 15.7 M of
    the 384 M instructions of luod's start (Python 3.14). A refusal makes
    its own; rendering an interface's IDL makes that interface's."""
    code = (
        "import luod.daemon;"
        "from luod import errors;"
        "from luod.varlink import replies;"
        "from luod.varlink.custody import CustodyInterface;"
        "print(len(replies.MADE));"
        "replies.reply(errors.NoSuchSession('s'));"
        "print(sorted(e.__name__ for e in replies.MADE));"
        "CustodyInterface.render_interface_description();"
        "print(len(replies.MADE) == len(errors.of_interface('io.luod.Custody')))"
    )
    assert fresh_python(code) == "0\n['NoSuchSession']\nTrue\n"


def test_reply_has_the_wire_parameters_only() -> None:
    r = reply(errors.InvalidName("name", "a/b", "no slashes"))
    assert r.name == f"{CUSTODY}.InvalidName"
    assert r.tojson() == {
        "error": f"{CUSTODY}.InvalidName",
        "parameters": {"parameter": "name", "reason": "no slashes"},
    }
    # An absent optional parameter is left out, not sent as null.
    r = reply(errors.KernelRefused("create_session", 17, "exists"))
    assert r.paramstojson() == {"operation": "create_session", "errno": 17, "message": "exists"}
    r = reply(errors.KernelRefused("preserve_fd", 12, "no memory", "s"))
    assert r.paramstojson()["session"] == "s"


def test_refused_logs_the_sentence_and_what_the_caller_is_not_told() -> None:
    with calling_as(NOBODY), capture_logs() as logs:
        r = refused("RetrieveFd", errors.PermissionDenied("s", "uid 0 (luoctl)"))
    assert r.name == f"{CUSTODY}.PermissionDenied" and r.paramstojson() == {"session": "s"}
    assert logs == [
        {
            "event": "call-refused",
            "log_level": "info",
            "method": "RetrieveFd",
            "error": f"{CUSTODY}.PermissionDenied",
            "detail": "session 's': only root may act on another user's sessions (owner)",
            "peer": NOBODY.describe(),
            "owner": "uid 0 (luoctl)",
        }
    ]


def test_refused_cuts_what_the_caller_sent_before_logging_it() -> None:
    # A lookup by a 1 MiB name (a message may be 16 MiB) must not write it
    # to the log: the reply names it, the log shows its start and length.
    name = "x" * (1 << 20)
    with calling_as(NOBODY), capture_logs() as logs:
        r = refused("RetrieveFd", errors.NoSuchSession(name))
        refused("CreateSession", errors.InvalidName("session", name, "too long"))
    assert r.paramstojson() == {"session": name}
    detail, value = logs[0]["detail"], logs[1]["value"]
    assert detail.startswith("no session named 'xxx") and len(detail) < 2200
    sentence = str(errors.NoSuchSession(name))
    assert detail.endswith(f"... ({len(sentence)} characters)")
    assert value.endswith(f"... ({len(name)} characters)") and len(value) < 2200


def test_translating_serves_catalogue_errors_and_nothing_else() -> None:
    @translating
    def refuses() -> None:
        raise errors.UpdateInProgress(3)

    @translating
    def breaks() -> None:
        raise KeyError("a bug")

    with calling_as(ROOT), pytest.raises(TypedVarlinkErrorReply) as e:
        refuses()
    assert e.value.tojson() == {"error": f"{MANAGER}.UpdateInProgress", "parameters": {"update": 3}}
    # A bug stays a bug: asyncvarlink answers it as an internal error.
    with calling_as(ROOT), pytest.raises(KeyError):
        breaks()


def test_foreign_acknowledge_is_a_named_manager_error() -> None:
    """The bug of issue 9: the orchestrator refused with a name the server
    had no reply for, and the caller got InternalServerError."""

    async def main() -> None:
        orch = Orchestrator()
        sub = orch.subscribe(ROOT, "roots", None, 0, [])
        manager = ManagerInterface(cast(Any, None), orch, cast(Any, None))
        with calling_as(NOBODY), pytest.raises(TypedVarlinkErrorReply) as e:
            manager.Acknowledge(sub.id, 1, Phase.prepare)
        assert e.value.tojson() == {
            "error": f"{MANAGER}.PermissionDenied",
            "parameters": {"subscription": sub.id},
        }
        assert type(e.value) in ManagerInterface.errors

    asyncio.run(main())
