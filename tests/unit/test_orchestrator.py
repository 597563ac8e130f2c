"""The barrier: phases, acknowledgements, every way an update aborts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from luod import errors
from luod.interfaces import MANAGER
from luod.orchestrator import Event, Orchestrator, Phase, Subscriber
from luod.peer import Peer

ALICE = Peer(pid=10, uid=1000, gid=1000, unit="alice.service", comm="alice")
BOB = Peer(pid=11, uid=1001, gid=1001, unit="bob.service", comm="bob")
ROOT = Peer(pid=1, uid=0, gid=0, comm="luoctl")


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
        orch = Orchestrator()
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
        orch = Orchestrator()
        jumped = Jumped()
        assert (await orch.run(jumped)).ok
        assert jumped.count == 1

    run(main())


@pytest.mark.parametrize("phase", [Phase.prepare, Phase.freeze])
def test_refusal_aborts_everyone_and_retry_works(phase: Phase) -> None:
    async def main() -> None:
        orch = Orchestrator()
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
        orch = Orchestrator()
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
        orch = Orchestrator()
        sub = orch.subscribe(ALICE, "edge", 0.5, 0, [])
        task = asyncio.create_task(acker(orch, sub, delay=0.3))
        assert (await orch.run(Jumped())).ok
        orch.unsubscribe(sub, "done")
        await task

    run(main())


def test_disconnect_during_update_aborts() -> None:
    async def main() -> None:
        orch = Orchestrator()
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
        orch = Orchestrator()
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
        orch = Orchestrator()
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
        orch = Orchestrator(max_deadline=60)
        for bad in (0, -1, 61):
            with pytest.raises(errors.InvalidDeadline) as bounds:
                orch.subscribe(ALICE, "x", bad, 0, [])
            assert (bounds.value.parameter, bounds.value.maximum) == ("deadlineSec", 60)
        orch.subscribe(ALICE, "x", 60, 0, [])
        with pytest.raises(errors.SubscriptionExists) as e:
            orch.subscribe(BOB, "x", 1, 0, [])
        assert e.value.name == "x"

    run(main())


def test_resumed_after_kexec_for_known_names_only() -> None:
    async def main() -> None:
        orch = Orchestrator()
        orch.expected_back = {"db": ALICE.uid}
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
        orch = Orchestrator()
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
