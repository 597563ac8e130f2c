"""RetrieveFds, the batch retrieve: luod as its own process on the fake
kernel, real memfds over the real socket, simulated kexecs. Many fds of a
session come back in one call, all or none; taking several rebuilds the
session once."""

from __future__ import annotations

import os

import pytest

from luod.client import MAX_FDS_PER_MESSAGE, Client, VarlinkError
from luod.interfaces import CUSTODY
from testsupport.luodproc import LuodProcess
from testsupport.util import MemfdFacts, make_memfd, memfd_facts, run_as, wait_until

N = 300  # more than one reply carries


def _hand_off(c: Client, session: str, n: int) -> dict[str, MemfdFacts]:
    """n memfds (distinct bytes, positions) into a new session; their facts."""
    facts: dict[str, MemfdFacts] = {}
    names = [f"f{i}" for i in range(n)]
    for start in range(0, n, MAX_FDS_PER_MESSAGE):
        part = names[start : start + MAX_FDS_PER_MESSAGE]
        fds = [make_memfd(f"{session} {name} ".encode() * 50, position=7) for name in part]
        try:
            c.preserve_fds(session, list(zip(part, fds, strict=True)), create_session=start == 0)
            facts.update((name, memfd_facts(fd)) for name, fd in zip(part, fds, strict=True))
        finally:
            for fd in fds:
                os.close(fd)
    return facts


def _check(got: list[tuple[str, int]], facts: dict[str, MemfdFacts]) -> None:
    try:
        for name, fd in got:
            assert memfd_facts(fd) == facts[name], name
    finally:
        for _name, fd in got:
            os.close(fd)


def _error(call: object) -> VarlinkError:
    assert callable(call)
    with pytest.raises(VarlinkError) as e:
        call()
    return e.value


def test_batch_retrieve_across_kexecs(luod: LuodProcess) -> None:
    with luod.client() as c:
        facts = _hand_off(c, "big", N)
    luod.kexec()
    names = list(facts)
    with luod.client() as c:
        # Every fd of the session does not fit one reply: refused, by name.
        e = _error(lambda: c.retrieve_fds("big"))
        assert (e.short, e.parameters) == (
            "TooManyFds",
            {"session": "big", "count": N, "limit": MAX_FDS_PER_MESSAGE},
        )
        # Named, in calls of at most 253: copies, byte for byte, position kept.
        got = c.retrieve_fds("big", names[:MAX_FDS_PER_MESSAGE])
        assert [n for n, _ in got] == names[:MAX_FDS_PER_MESSAGE]
        _check(got, facts)
        got = c.retrieve_fds("big", list(reversed(names[MAX_FDS_PER_MESSAGE:])))
        assert [n for n, _ in got] == list(reversed(names[MAX_FDS_PER_MESSAGE:]))
        _check(got, facts)
        assert len(c.list_sessions("big")[0]["files"]) == N

        # Taking three: luod lets go of them, the session is preserved again
        # once, without them.
        taken = ["f0", "f150", "f299"]
        got = c.retrieve_fds("big", taken, take=True)
        assert [n for n, _ in got] == taken
        _check(got, facts)
        [session] = c.list_sessions("big")
        assert len(session["files"]) == N - 3
        assert not {f["name"] for f in session["files"]} & set(taken)
    log = luod.log()
    assert log.count("event=fds-taken") == 1 and "count=3" in log
    left = [n for n in names if n not in taken]

    # What remains is carried over the next kexec, and comes back whole.
    luod.kexec()
    with luod.client() as c:
        got = c.retrieve_fds("big", left[:MAX_FDS_PER_MESSAGE], take=True)
        got += c.retrieve_fds("big", take=True)  # the rest, all of it
        assert sorted(n for n, _ in got) == sorted(left)
        _check(got, facts)
        # The last fd taken: the session is gone.
        assert c.list_sessions() == []


def test_batch_retrieve_is_all_or_nothing(luod: LuodProcess) -> None:
    with luod.client() as c:
        facts = _hand_off(c, "app", 5)
        os.close(c.create_delegated_session("own"))
        # Counted with the connection the calls below are made on open: the
        # count a moment after a connection closed holds its socket or not.
        c.list_sessions()  # and after luod closed its copy of the last reply's fd
        baseline = luod.fd_count()
        for take in (False, True):
            for params, error, detail in (
                ({"names": ["f0", "nope"]}, "NoSuchFd", {"session": "app", "name": "nope"}),
                ({"names": ["f0", "f1", "f0"]}, "InvalidName", {"parameter": "names[2]"}),
                ({"session": "own"}, "WrongSessionKind", {"session": "own"}),
                ({"session": "none"}, "NoSuchSession", {"session": "none"}),
            ):
                call: dict[str, object] = {"session": "app", **params}
                if take:
                    call["take"] = True
                with pytest.raises(VarlinkError) as e:
                    c.call(f"{CUSTODY}.RetrieveFds", call)
                assert e.value.short == error, (call, e.value)
                assert detail.items() <= e.value.parameters.items(), (call, e.value)
            # Nothing changed, nothing was handed out or kept.
            assert sorted(f["name"] for f in c.list_sessions("app")[0]["files"]) == sorted(facts)
        wait_until(lambda: luod.fd_count() <= baseline, "luod back at its fd count")
        # An empty list is no error: nothing to hand out.
        assert c.retrieve_fds("app", [], take=True) == []
        # All of them, in one call: the session is let go of.
        got = c.retrieve_fds("app", take=True)
        assert [n for n, _ in got] == list(facts)
        _check(got, facts)
        assert [s["name"] for s in c.list_sessions()] == ["own"]


def test_batch_retrieve_names_are_per_owner(luod: LuodProcess) -> None:
    with luod.client() as c:
        facts = _hand_off(c, "app", 2)

    def as_nobody() -> list[str]:
        out = []
        with luod.client() as c:
            for owner in (None, 0):
                try:
                    c.retrieve_fds("app", owner=owner)
                    out.append("retrieved")
                except VarlinkError as e:
                    out.append(e.short)
        return out

    # Another uid's session is no session to it; naming its owner is refused.
    assert run_as(65534, as_nobody) == ["NoSuchSession", "PermissionDenied"]
    with luod.client() as c:
        # Naming its own uid as owner is as without.
        got = c.retrieve_fds("app", ["f1"], owner=os.getuid())
        _check(got, facts)
