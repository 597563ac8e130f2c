"""The live update as a sequence of phases, with subscribers and a barrier.

A workload (VMM, database, cache) subscribes and is told, in order:
`prepare` (an update is starting: finish what you are doing), `freeze` (last
call: make your preserved state final). It acknowledges each within its
deadline. Only when every subscriber acknowledged `freeze` does the update
hand over to the kexec. A refusal, a missed deadline or a subscriber going
away aborts the update: every subscriber gets `aborted` with who and why,
nothing preserved is dropped, and the same update can be started again.
After the kexec a subscriber that reconnects under the same name gets
`resumed`.

No varlink and no kernel here: the server feeds calls in, `jump` is given.
Refusals are errors of the catalogue (luod.errors), served as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import secrets
import time
from collections.abc import Awaitable, Callable

import structlog

from luod import errors
from luod.peer import Peer

log = structlog.get_logger("luod")

DEFAULT_DEADLINE = 30.0
MAX_DEADLINE = 300.0


class Phase(enum.Enum):
    subscribed = "subscribed"
    prepare = "prepare"
    freeze = "freeze"
    aborted = "aborted"
    resumed = "resumed"


@dataclasses.dataclass
class Event:
    phase: Phase
    subscription: str
    update: int | None = None
    deadline: float | None = None  # wall clock, for the subscriber
    reason: str | None = None
    kexec_count: int | None = None
    sessions: list[str] | None = None


@dataclasses.dataclass
class Subscriber:
    id: str
    name: str
    peer: Peer
    deadline: float
    # None ends the stream (the subscription is gone).
    queue: asyncio.Queue[Event | None] = dataclasses.field(default_factory=asyncio.Queue)
    acked: set[tuple[int, Phase]] = dataclasses.field(default_factory=set)
    sent: set[tuple[int, Phase]] = dataclasses.field(default_factory=set)
    last_event: Phase = Phase.subscribed
    # idle, prepare, acked-prepare, freeze, acked-freeze, refused, gone
    state: str = "idle"
    refusal: str | None = None

    def send(self, event: Event) -> None:
        if event.update is not None:
            self.sent.add((event.update, event.phase))
        self.last_event = event.phase
        self.queue.put_nowait(event)


@dataclasses.dataclass
class Outcome:
    update: int
    ok: bool
    reason: str | None = None
    who: str | None = None
    phases: dict[str, float] = dataclasses.field(default_factory=dict)


class Orchestrator:
    def __init__(
        self,
        max_deadline: float = MAX_DEADLINE,
        clock: Callable[[], float] = time.time,
        on_subscribe: Callable[[str, int], None] | None = None,
    ) -> None:
        self.max_deadline = max_deadline
        self.on_subscribe = on_subscribe
        self.clock = clock
        self.subscribers: dict[str, Subscriber] = {}
        self.update_id = 0
        self.running: int | None = None
        self.last_outcome: Outcome | None = None
        self._changed = asyncio.Event()
        # Names (with uids) of those who subscribed before the last kexec.
        self.expected_back: dict[str, int] = {}

    # --- subscriptions -----------------------------------------------------

    def subscribe(
        self,
        peer: Peer,
        name: str,
        deadline: float | None,
        kexec_count: int,
        sessions: list[str],
    ) -> Subscriber:
        if deadline is not None and not 0 < deadline <= self.max_deadline:
            raise errors.InvalidDeadline("deadlineSec", int(self.max_deadline))
        for s in self.subscribers.values():
            if s.name == name:
                raise errors.SubscriptionExists(name)
        sub = Subscriber(
            id=secrets.token_hex(8),
            name=name,
            peer=peer,
            deadline=min(deadline or DEFAULT_DEADLINE, self.max_deadline),
        )
        self.subscribers[sub.id] = sub
        if self.on_subscribe is not None:
            self.on_subscribe(name, peer.uid)
        if self.expected_back.get(name) == peer.uid:
            del self.expected_back[name]
            sub.send(Event(Phase.resumed, sub.id, kexec_count=kexec_count, sessions=sessions))
        else:
            sub.send(Event(Phase.subscribed, sub.id, kexec_count=kexec_count))
        log.info(
            "subscribed",
            subscriber=name,
            subscription=sub.id,
            owner=peer.describe(),
            deadline=sub.deadline,
        )
        return sub

    def unsubscribe(self, sub: Subscriber, why: str) -> None:
        if self.subscribers.pop(sub.id, None) is None:
            return
        log.info("unsubscribed", subscriber=sub.name, subscription=sub.id, reason=why)
        sub.state = "gone"
        sub.queue.put_nowait(None)
        self._changed.set()

    def end_all(self, why: str) -> None:
        """luod is stopping: end every subscription's stream cleanly."""
        for sub in list(self.subscribers.values()):
            self.unsubscribe(sub, why)

    def names(self) -> list[tuple[str, int]]:
        return [(s.name, s.peer.uid) for s in self.subscribers.values()]

    # --- acknowledgements ---------------------------------------------------

    def acknowledge(
        self,
        peer: Peer,
        subscription: str,
        update: int,
        phase: Phase,
        refuse: bool,
        reason: str | None,
    ) -> None:
        sub = self.subscribers.get(subscription)
        if sub is None:
            raise errors.NoSuchSubscription(subscription)
        if not peer.is_root and peer.uid != sub.peer.uid:
            raise errors.SubscriptionPermissionDenied(subscription, sub.peer.describe())

        def unexpected(why: str) -> errors.UnexpectedAcknowledge:
            return errors.UnexpectedAcknowledge(subscription, update, phase.value, why)

        if phase not in (Phase.prepare, Phase.freeze):
            raise unexpected("only prepare and freeze are acknowledged")
        if (update, phase) not in sub.sent:
            raise unexpected("this event was never sent to this subscription")
        if (update, phase) in sub.acked:
            raise unexpected("acknowledged already")
        if self.running != update:
            raise unexpected("that update is over")
        sub.acked.add((update, phase))
        if refuse:
            sub.state = "refused"
            sub.refusal = reason or "no reason given"
        else:
            sub.state = f"acked-{phase.value}"
        log.info(
            "acknowledged",
            subscriber=sub.name,
            update=update,
            phase=phase.value,
            refused=refuse,
            reason=reason or "-",
        )
        self._changed.set()

    # --- the update ----------------------------------------------------------

    async def run(self, jump: Callable[[], Awaitable[None]]) -> Outcome:
        """prepare → freeze → jump, with the barrier after each phase."""
        if self.running is not None:
            raise errors.UpdateInProgress(self.running)
        self.update_id += 1
        update = self.update_id
        self.running = update
        outcome = Outcome(update, ok=False)
        participants = list(self.subscribers.values())
        log.info("update-started", update=update, subscribers=len(participants))
        try:
            for phase in (Phase.prepare, Phase.freeze):
                t0 = time.monotonic()
                failure = await self._phase(update, phase, participants)
                outcome.phases[phase.value] = time.monotonic() - t0
                log.info(
                    "phase-done",
                    update=update,
                    phase=phase.value,
                    seconds=round(outcome.phases[phase.value], 4),
                    ok=failure is None,
                )
                if failure is not None:
                    outcome.who, outcome.reason = failure
                    self._abort(update, outcome)
                    return outcome
            log.info(
                "barrier-passed",
                update=update,
                **{f"{k}_seconds": round(v, 4) for k, v in outcome.phases.items()},
            )
            try:
                await jump()
            except Exception as e:
                # Everyone froze for nothing: tell them, so they thaw.
                outcome.who, outcome.reason = "luod", f"the kexec could not start: {e}"
                self._abort(update, outcome)
                raise
            outcome.ok = True
            return outcome
        finally:
            self.running = None
            for s in participants:
                if s.state != "gone":
                    s.state = "idle"
            self.last_outcome = outcome

    async def _phase(
        self, update: int, phase: Phase, participants: list[Subscriber]
    ) -> tuple[str, str] | None:
        now = self.clock()
        loop_now = asyncio.get_running_loop().time()
        ends: dict[str, float] = {}
        for s in participants:
            if s.id not in self.subscribers:
                return s.name, "disconnected before the update"
            s.state = phase.value
            s.send(Event(phase, s.id, update=update, deadline=now + s.deadline))
            ends[s.id] = loop_now + s.deadline
        while True:
            for s in participants:
                if s.state == "gone" or s.id not in self.subscribers:
                    return s.name, f"disconnected during {phase.value}"
                if s.state == "refused":
                    return s.name, f"refused {phase.value}: {s.refusal}"
            pending = [s for s in participants if (update, phase) not in s.acked]
            if not pending:
                return None
            t = asyncio.get_running_loop().time()
            late = [s for s in pending if ends[s.id] <= t]
            if late:
                return late[
                    0
                ].name, f"did not acknowledge {phase.value} within {late[0].deadline:g}s"
            self._changed.clear()
            timeout = min(ends[s.id] for s in pending) - t
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    def _abort(self, update: int, outcome: Outcome) -> None:
        self.last_outcome = outcome
        log.warning("update-aborted", update=update, subscriber=outcome.who, reason=outcome.reason)
        for s in self.subscribers.values():
            s.send(
                Event(Phase.aborted, s.id, update=update, reason=f"{outcome.who}: {outcome.reason}")
            )
