"""The barrier: phases, acknowledgements, every way an update aborts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from luod import errors
from luod.interfaces import MANAGER
from luod.orchestrator import Event, Orchestrator, Phase, Policy, Subscriber
from luod.peer import Peer

ALICE = Peer(pid=10, uid=1000, gid=1000, unit="alice.service", comm="alice")
BOB = Peer(pid=11, uid=1001, gid=1001, unit="bob.service", comm="bob")
ROOT = Peer(pid=1, uid=0, gid=0, comm="luoctl")
NOBODY = Peer(pid=12, uid=65534, gid=65534, comm="intruder")
# The barrier's mechanics, with alice and bob allowed to stop updates
# (--update-veto) and room for many subscriptions.
VETO = Policy(veto_uids=frozenset({ALICE.uid, BOB.uid}), max_subscriptions=1000)


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


class Jumped:
    def __init__(self) -> None:
        self.count = 0

    async def __call__(self) -> None:
        self.count += 1


async def acker(
    orch: Orchestrator,
    sub: Subscriber,
    on: Callable[[Event], tuple[bool, str | None] | None] = lambda e: (False, None),
    delay: float = 0.0,
) -> list[Phase]:
    """A well-behaved subscriber by default: acknowledges every phase."""
    seen: list[Phase] = []
    while True:
        ev = await sub.queue.get()
        if ev is None:
            return seen
        seen.append(ev.phase)
        if ev.phase in (Phase.prepare, Phase.freeze):
            answer = on(ev)
            if answer is None:
                continue  # stays silent
            await asyncio.sleep(delay)
            refuse, reason = answer
            assert ev.update is not None
            orch.acknowledge(sub.peer, sub.id, ev.update, ev.phase, refuse, reason)
        if ev.phase is Phase.aborted and ev.update is not None:
            pass


def test_hundred_subscribers_all_acknowledge() -> None:
    async def main() -> None:
        orch = Orchestrator(policy=VETO)
        subs = [orch.subscribe(ALICE, f"s{i}", 5, 0, []) for i in range(100)]
        tasks = [asyncio.create_task(acker(orch, s)) for s in subs]
        jumped = Jumped()
        outcome = await orch.run(jumped)
        assert outcome.ok and jumped.count == 1
        assert set(outcome.phases) == {"prepare", "freeze"}
        for s in subs:
            orch.unsubscribe(s, "test over")
        for seen in await asyncio.gather(*tasks):
            assert seen == [Phase.subscribed, Phase.prepare, Phase.freeze]

    run(main())


def test_no_subscribers_passes_at_once() -> None:
    async def main() -> None:
        orch = Orchestrator(policy=VETO)
        jumped = Jumped()
        assert (await orch.run(jumped)).ok
        assert jumped.count == 1

    run(main())


@pytest.mark.parametrize("phase", [Phase.prepare, Phase.freeze])
def test_refusal_aborts_everyone_and_retry_works(phase: Phase) -> None:
    async def main() -> None:
        orch = Orchestrator(policy=VETO)
        good = orch.subscribe(ALICE, "good", 5, 0, [])
        bad = orch.subscribe(BOB, "bad", 5, 0, [])
        refuse_once = {"left": 1}

        def bad_answer(ev: Event) -> tuple[bool, str | None]:
            if ev.phase is phase and refuse_once["left"]:
                refuse_once["left"] -= 1
                return True, "writing a checkpoint"
            return False, None

        tasks = [
            asyncio.create_task(acker(orch, good)),
            asyncio.create_task(acker(orch, bad, bad_answer)),
        ]
        jumped = Jumped()
        outcome = await orch.run(jumped)
        assert not outcome.ok and jumped.count == 0
        assert outcome.who == "bad"
        assert outcome.reason == f"refused {phase.value}: writing a checkpoint"
        # Same update again: now everyone agrees.
        outcome = await orch.run(jumped)
        assert outcome.ok and jumped.count == 1
        for s in (good, bad):
            orch.unsubscribe(s, "done")
        seen_good, _seen_bad = await asyncio.gather(*tasks)
        assert Phase.aborted in seen_good
        assert seen_good[-2:] == [Phase.prepare, Phase.freeze]

    run(main())


def test_missed_deadline_aborts() -> None:
    async def main() -> None:
        orch = Orchestrator(policy=VETO)
        slow = orch.subscribe(ALICE, "slow", 0.3, 0, [])
        quick = orch.subscribe(BOB, "quick", 5, 0, [])
        tasks = [
            asyncio.create_task(acker(orch, slow, lambda e: None)),  # never answers
            asyncio.create_task(acker(orch, quick)),
        ]
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        outcome = await orch.run(Jumped())
        took = loop.time() - t0
        assert not outcome.ok
        assert outcome.who == "slow"
        assert outcome.reason == "did not acknowledge prepare within 0.3s"
        assert 0.25 < took < 3.0
        for s in (slow, quick):
            orch.unsubscribe(s, "done")
        await asyncio.gather(*tasks)

    run(main())


def test_acknowledge_just_before_deadline_passes() -> None:
    async def main() -> None:
        orch = Orchestrator(policy=VETO)
        sub = orch.subscribe(ALICE, "edge", 0.5, 0, [])
        task = asyncio.create_task(acker(orch, sub, delay=0.3))
        assert (await orch.run(Jumped())).ok
        orch.unsubscribe(sub, "done")
        await task

    run(main())


def test_disconnect_during_update_aborts() -> None:
    async def main() -> None:
        orch = Orchestrator(policy=VETO)
        stays = orch.subscribe(ALICE, "stays", 5, 0, [])
        leaves = orch.subscribe(BOB, "leaves", 5, 0, [])

        def leave(ev: Event) -> None:
            orch.unsubscribe(leaves, "disconnected")
            return None

        tasks = [
            asyncio.create_task(acker(orch, stays)),
            asyncio.create_task(acker(orch, leaves, leave)),
        ]
        outcome = await orch.run(Jumped())
        assert not outcome.ok
        assert outcome.who == "leaves"
        assert outcome.reason == "disconnected during prepare"
        orch.unsubscribe(stays, "done")
        seen, _ = await asyncio.gather(*tasks)
        assert seen[-1] is Phase.aborted

    run(main())


def test_bad_acknowledgements_are_named_and_harmless() -> None:
    async def main() -> None:
        orch = Orchestrator(policy=VETO)
        sub = orch.subscribe(ALICE, "a", 2, 0, [])
        await sub.queue.get()  # subscribed

        def code(call: Callable[[], None]) -> str:
            with pytest.raises(errors.LuodError) as e:
                call()
            assert e.value.interface == MANAGER
            return e.value.varlink_name

        # Never sent: no update yet.
        assert (
            code(lambda: orch.acknowledge(ALICE, sub.id, 1, Phase.prepare, False, None))
            == "UnexpectedAcknowledge"
        )
        assert (
            code(lambda: orch.acknowledge(ALICE, "nope", 1, Phase.prepare, False, None))
            == "NoSuchSubscription"
        )
        assert (
            code(lambda: orch.acknowledge(BOB, sub.id, 1, Phase.prepare, False, None))
            == "PermissionDenied"
        )
        assert (
            code(lambda: orch.acknowledge(ALICE, sub.id, 1, Phase.resumed, False, None))
            == "UnexpectedAcknowledge"
        )

        async def client() -> None:
            ev = await sub.queue.get()
            assert ev is not None and ev.phase is Phase.prepare and ev.update == 1
            # Freeze was not sent yet.
            assert (
                code(lambda: orch.acknowledge(ALICE, sub.id, 1, Phase.freeze, False, None))
                == "UnexpectedAcknowledge"
            )
            orch.acknowledge(ALICE, sub.id, 1, Phase.prepare, False, None)
            # Twice: refused, the barrier does not notice.
            assert (
                code(lambda: orch.acknowledge(ALICE, sub.id, 1, Phase.prepare, False, None))
                == "UnexpectedAcknowledge"
            )
            ev = await sub.queue.get()
            assert ev is not None and ev.phase is Phase.freeze
            orch.acknowledge(ROOT, sub.id, 1, Phase.freeze, False, None)  # root may

        task = asyncio.create_task(client())
        assert (await orch.run(Jumped())).ok
        await task
        # After the update: too late.
        assert (
            code(lambda: orch.acknowledge(ALICE, sub.id, 1, Phase.freeze, False, None))
            == "UnexpectedAcknowledge"
        )

    run(main())


def test_concurrent_update_refused() -> None:
    async def main() -> None:
        orch = Orchestrator(policy=VETO)
        sub = orch.subscribe(ALICE, "a", 1, 0, [])
        first = asyncio.create_task(orch.run(Jumped()))
        await asyncio.sleep(0.05)
        with pytest.raises(errors.UpdateInProgress) as e:
            await orch.run(Jumped())
        assert e.value.update == 1
        outcome = await first  # nobody acknowledges: deadline
        assert not outcome.ok
        orch.unsubscribe(sub, "done")

    run(main())


def test_deadline_bounds_and_duplicate_names() -> None:
    async def main() -> None:
        orch = Orchestrator(max_deadline=60, policy=VETO)
        for bad in (0, -1, 61):
            with pytest.raises(errors.InvalidDeadline) as bounds:
                orch.subscribe(ALICE, "x", bad, 0, [])
            assert (bounds.value.parameter, bounds.value.maximum) == ("deadlineSec", 60)
        orch.subscribe(ALICE, "x", 60, 0, [])
        with pytest.raises(errors.SubscriptionExists) as e:
            orch.subscribe(ALICE, "x", 1, 0, [])
        assert e.value.name == "x"

    run(main())


def test_resumed_after_kexec_for_known_names_only() -> None:
    async def main() -> None:
        orch = Orchestrator(policy=VETO)
        orch.expected_back = {("db", ALICE.uid)}
        db = orch.subscribe(ALICE, "db", None, 3, ["db-state"])
        ev = await db.queue.get()
        assert ev is not None and ev.phase is Phase.resumed
        assert (ev.kexec_count, ev.sessions) == (3, ["db-state"])
        other = orch.subscribe(BOB, "cache", None, 3, [])
        ev = await other.queue.get()
        assert ev is not None and ev.phase is Phase.subscribed

    run(main())


def test_failed_jump_aborts_so_subscribers_thaw() -> None:
    async def main() -> None:
        orch = Orchestrator(policy=VETO)
        sub = orch.subscribe(ALICE, "a", 2, 0, [])
        task = asyncio.create_task(acker(orch, sub))

        async def broken() -> None:
            raise RuntimeError("systemctl kexec failed")

        with pytest.raises(RuntimeError):
            await orch.run(broken)
        assert orch.last_outcome is not None and not orch.last_outcome.ok
        assert orch.last_outcome.reason == "the kexec could not start: systemctl kexec failed"
        orch.unsubscribe(sub, "done")
        assert (await task)[-1] is Phase.aborted

    run(main())


# --- the policy: who may stop an update, names and quotas per uid -------------


def _refuse(phase: Phase) -> Callable[[Event], tuple[bool, str | None]]:
    return lambda ev: (True, "busy") if ev.phase is phase else (False, None)


@pytest.mark.parametrize("how", ["refuses prepare", "refuses freeze", "stays silent", "goes away"])
def test_a_subscriber_that_may_not_veto_is_told_everything_and_stops_nothing(how: str) -> None:
    async def main() -> None:
        orch = Orchestrator()  # the default policy: only root stops updates
        vmm = orch.subscribe(ROOT, "vmm", 5, 0, [])
        other = orch.subscribe(NOBODY, "vmm", 0.3, 0, [])
        on: Callable[[Event], tuple[bool, str | None] | None] = {
            "refuses prepare": _refuse(Phase.prepare),
            "refuses freeze": _refuse(Phase.freeze),
            "stays silent": lambda ev: None,
            "goes away": lambda ev: orch.unsubscribe(other, "disconnected"),
        }[how]
        tasks = [
            asyncio.create_task(acker(orch, vmm)),
            asyncio.create_task(acker(orch, other, on)),
        ]
        jumped = Jumped()
        outcome = await orch.run(jumped)
        assert outcome.ok and jumped.count == 1
        # Logged and recorded: who, and why (silent: in both phases).
        assert len(outcome.overridden) == (2 if how == "stays silent" else 1)
        assert all(o.startswith("vmm (uid 65534): ") for o in outcome.overridden)
        for s in (vmm, other):
            orch.unsubscribe(s, "done")
        seen_root, seen_other = await asyncio.gather(*tasks)
        assert seen_root == [Phase.subscribed, Phase.prepare, Phase.freeze]
        if how == "goes away":
            assert seen_other == [Phase.subscribed, Phase.prepare]
        else:
            assert seen_other == [Phase.subscribed, Phase.prepare, Phase.freeze]

    run(main())


def test_update_veto_option_lets_a_uid_stop_updates() -> None:
    async def main() -> None:
        orch = Orchestrator(policy=Policy(veto_uids=frozenset({NOBODY.uid})))
        sub = orch.subscribe(NOBODY, "db", 5, 0, [])
        assert sub.may_veto and not orch.subscribe(ALICE, "db", 5, 0, []).may_veto
        task = asyncio.create_task(acker(orch, sub, _refuse(Phase.prepare)))
        outcome = await orch.run(Jumped())
        assert (outcome.ok, outcome.who, outcome.who_uid) == (False, "db", NOBODY.uid)
        orch.unsubscribe(sub, "done")
        await task

    run(main())


def test_force_goes_past_every_refusal_and_timeout_even_roots() -> None:
    async def main() -> None:
        orch = Orchestrator()
        refuser = orch.subscribe(ROOT, "vmm", 5, 0, [])
        silent = orch.subscribe(ROOT, "db", 0.2, 0, [])
        theirs = orch.subscribe(NOBODY, "x", 5, 0, [])
        tasks = [
            asyncio.create_task(acker(orch, refuser, _refuse(Phase.freeze))),
            asyncio.create_task(acker(orch, silent, lambda ev: None)),
            asyncio.create_task(acker(orch, theirs, _refuse(Phase.prepare))),
        ]
        jumped = Jumped()
        outcome = await orch.run(jumped, force=True)
        assert outcome.ok and jumped.count == 1
        assert sorted(outcome.overridden) == [
            "db (uid 0): did not acknowledge freeze within 0.2s",
            "db (uid 0): did not acknowledge prepare within 0.2s",
            "vmm (uid 0): refused freeze: busy",
            "x (uid 65534): refused prepare: busy",
        ]
        for s in (refuser, silent, theirs):
            orch.unsubscribe(s, "done")
        for seen in await asyncio.gather(*tasks):
            assert seen == [Phase.subscribed, Phase.prepare, Phase.freeze]

    run(main())


def test_who_refused_is_told_to_root_and_the_refusers_uid_only() -> None:
    async def main() -> None:
        orch = Orchestrator(policy=Policy(veto_uids=frozenset({ALICE.uid})))
        refuser = orch.subscribe(ALICE, "db", 5, 0, [])
        others = [
            orch.subscribe(ALICE, "db2", 5, 0, []),
            orch.subscribe(ROOT, "vmm", 5, 0, []),
            orch.subscribe(NOBODY, "x", 5, 0, []),
        ]
        task = asyncio.create_task(acker(orch, refuser, _refuse(Phase.prepare)))
        assert not (await orch.run(Jumped())).ok
        orch.unsubscribe(refuser, "done")
        await task
        reasons = {}
        for s in others:
            events = [s.queue.get_nowait() for _ in range(s.queue.qsize())]
            assert [e.phase for e in events if e is not None] == [
                Phase.subscribed,
                Phase.prepare,
                Phase.aborted,
            ]
            last = events[-1]
            assert last is not None
            reasons[s.name] = last.reason
        assert reasons == {
            "db2": "db: refused prepare: busy",
            "vmm": "db: refused prepare: busy",
            "x": "stopped by a subscriber of another user",
        }
        # And in the status: the last update's outcome, as each may see it.
        for peer in (ROOT, ALICE):
            assert orch.last_outcome_for(peer) is orch.last_outcome
        seen = orch.last_outcome_for(NOBODY)
        assert seen is not None and (seen.ok, seen.update) == (False, 1)
        assert (seen.who, seen.reason) == (None, "stopped by a subscriber of another user")

    run(main())


def test_names_are_per_uid_in_both_orders() -> None:
    async def main() -> None:
        for first, second in ((ROOT, NOBODY), (NOBODY, ROOT)):
            orch = Orchestrator()
            a = orch.subscribe(first, "vmm", 5, 0, [])
            b = orch.subscribe(second, "vmm", 5, 0, [])
            assert a.id != b.id and (a.peer, b.peer) == (first, second)
            for peer in (first, second):
                with pytest.raises(errors.SubscriptionExists):
                    orch.subscribe(peer, "vmm", 5, 0, [])
            # What each sees: root everything, anyone else its own.
            assert orch.visible_to(ROOT) == [a, b]
            assert orch.visible_to(NOBODY) == [a if first is NOBODY else b]
            assert orch.visible_to(ALICE) == []
            # Not another uid's to acknowledge, whatever the id.
            theirs = a if first is ROOT else b
            with pytest.raises(errors.SubscriptionPermissionDenied):
                orch.acknowledge(NOBODY, theirs.id, 1, Phase.prepare, True, "no")
            orch.unsubscribe(a, "gone")
            assert orch.subscribe(first, "vmm", 5, 0, []).peer == first  # free again

    run(main())


def test_resumed_matches_name_and_uid() -> None:
    async def main() -> None:
        orch = Orchestrator()
        orch.expected_back = {("vmm", ROOT.uid)}
        # nobody first, under root's name: not resumed, and root still is.
        ev = await orch.subscribe(NOBODY, "vmm", None, 1, []).queue.get()
        assert ev is not None and ev.phase is Phase.subscribed
        ev = await orch.subscribe(ROOT, "vmm", None, 1, ["guest"]).queue.get()
        assert ev is not None and (ev.phase, ev.sessions) == (Phase.resumed, ["guest"])

    run(main())


def test_subscriptions_are_bounded_per_uid_with_roots_own_pool() -> None:
    async def main() -> None:
        noted: list[tuple[str, int]] = []
        policy = Policy(max_subscriptions=3, max_subscriptions_root=5)
        orch = Orchestrator(policy=policy, on_subscribe=lambda n, u: noted.append((n, u)))
        mine = [orch.subscribe(NOBODY, f"s{i}", 5, 0, []) for i in range(3)]
        with pytest.raises(errors.SubscriptionQuotaExceeded) as e:
            orch.subscribe(NOBODY, "s3", 5, 0, [])
        assert (e.value.error_name, e.value.resource, e.value.limit) == (
            f"{MANAGER}.QuotaExceeded",
            "subscriptions",
            3,
        )
        assert [s.name for s in orch.visible_to(NOBODY)] == ["s0", "s1", "s2"]
        # Another uid, and root, are not affected.
        orch.subscribe(ALICE, "s0", 5, 0, [])
        for i in range(5):
            orch.subscribe(ROOT, f"r{i}", 5, 0, [])
        with pytest.raises(errors.SubscriptionQuotaExceeded):
            orch.subscribe(ROOT, "r5", 5, 0, [])
        # Letting go frees a place; a uid cycling through names is not
        # remembered for "resumed" beyond its limit (the manifest stays bounded).
        for i in range(10):
            orch.unsubscribe(mine.pop(), "gone")
            mine.append(orch.subscribe(NOBODY, f"n{i}", 5, 0, []))
        assert len([n for n, u in noted if u == NOBODY.uid]) == 3

    run(main())
