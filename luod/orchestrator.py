"""The live update as a sequence of phases, with subscribers and a barrier.

A workload (VMM, database, cache) subscribes and is told, in order:
`prepare` (an update is starting: finish what you are doing), `freeze` (last
call: make your preserved state final). It acknowledges each within its
deadline. Only when every subscriber acknowledged `freeze` does the update
hand over to the kexec. A refusal, a missed deadline or a subscriber going
away aborts the update: every subscriber gets `aborted` with who and why,
nothing preserved is dropped, and the same update can be started again.
After the kexec a subscriber that reconnects under the same name (and uid)
gets `resumed`.

Who may stop an update (the Policy): any uid may subscribe and is told every
phase, but only a subscriber of root or of a uid luod's --update-veto names
aborts the update by refusing, missing its deadline or going away; anyone
else's is logged and the update goes on. A forced update goes on past every
one of them, logged with who and why. Names are unique per uid, never
across uids, and each uid holds a bounded number of subscriptions.

No varlink and no kernel here: the server feeds calls in, `jump` is given.
Refusals are errors of the catalogue (luod.errors), served as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import os
import time
from collections.abc import Awaitable, Callable

from luod import errors, names
from luod.log import get_logger, shown
from luod.peer import Peer
from luod.record import record

log = get_logger()

DEFAULT_DEADLINE = 30.0
MAX_DEADLINE = 300.0
# What a user is told of an abort that another user's subscriber caused.
STOPPED_BY_ANOTHER_USER = "stopped by a subscriber of another user"
# Subscriptions a uid may hold at once: any non-root uid, and root's own pool.
MAX_SUBSCRIPTIONS = 16
MAX_SUBSCRIPTIONS_ROOT = 256
# A refusal's reason as luod keeps it (logged, told to whoever learns of
# the refusal): its first characters and its length. A caller's string
# can be as long as a message (16 MiB).
REASON_SHOWN = 1024


@record(frozen=True)
class Policy:
    """Who may stop an update, and how many subscriptions a uid may hold."""

    # Besides root: uids whose subscribers' refusals abort an unforced update.
    veto_uids: frozenset[int] = frozenset()
    max_subscriptions: int = MAX_SUBSCRIPTIONS
    max_subscriptions_root: int = MAX_SUBSCRIPTIONS_ROOT

    def may_veto(self, peer: Peer) -> bool:
        return peer.is_root or peer.uid in self.veto_uids

    def limit(self, peer: Peer) -> int:
        return self.max_subscriptions_root if peer.is_root else self.max_subscriptions


class Phase(enum.Enum):
    subscribed = "subscribed"
    prepare = "prepare"
    freeze = "freeze"
    aborted = "aborted"
    resumed = "resumed"


@record
class Event:
    """What a subscriber is told of an update: a phase, and what it concerns."""

    phase: Phase
    subscription: str
    update: int | None = None
    deadline: float | None = None  # wall clock, for the subscriber
    reason: str | None = None
    kexec_count: int | None = None
    sessions: list[str] | None = None


@record
class Subscriber:
    """A subscription to the update barrier, and where it stands in the update."""

    id: str
    name: str
    peer: Peer
    deadline: float
    # Its refusal, missed deadline or going away aborts an unforced update.
    may_veto: bool = True
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


@record
class Outcome:
    """How an update ended: done or aborted, by whom, and its phases' times."""

    update: int
    ok: bool
    reason: str | None = None
    who: str | None = None
    # The uid of the subscriber that aborted it (None: luod itself).
    who_uid: int | None = None
    # Refusals, timeouts and departures the update went on past, as
    # "NAME (uid N): REASON" (forced, or of a subscriber that may not veto).
    overridden: list[str] = dataclasses.field(default_factory=list)
    phases: dict[str, float] = dataclasses.field(default_factory=dict)


class Orchestrator:
    def __init__(
        self,
        max_deadline: float = MAX_DEADLINE,
        clock: Callable[[], float] = time.time,
        on_subscribe: Callable[[str, int], None] | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.max_deadline = max_deadline
        self.on_subscribe = on_subscribe
        self.clock = clock
        self.policy = policy or Policy()
        # By subscription id (what clients are given), and by owner and name.
        self.subscribers: dict[str, Subscriber] = {}
        self.by_owner: dict[int, dict[str, Subscriber]] = {}
        self.update_id = 0
        self.running: int | None = None
        self.last_outcome: Outcome | None = None
        self._changed = asyncio.Event()
        # (name, uid) of those who subscribed before the last kexec.
        self.expected_back: set[tuple[str, int]] = set()
        # Names each uid subscribed under in this luod's life, as handed to
        # on_subscribe (the manifest): at most its subscription limit, so
        # that a uid cycling through names cannot grow the manifest.
        self._noted: dict[int, set[str]] = {}

    # --- subscriptions -----------------------------------------------------

    def subscribe(
        self,
        peer: Peer,
        name: str,
        deadline: float | None,
        kexec_count: int,
        sessions: list[str],
    ) -> Subscriber:
        names.check_subscriber_name(name)
        if deadline is not None and not 0 < deadline <= self.max_deadline:
            raise errors.InvalidDeadline("deadlineSec", int(self.max_deadline))
        # Names are the owner's: another uid's subscriber of the same name
        # is another subscriber, and nothing here says it exists.
        mine = self.by_owner.get(peer.uid, {})
        if name in mine:
            raise errors.SubscriptionExists(name)
        limit = self.policy.limit(peer)
        if len(mine) >= limit:
            raise errors.SubscriptionQuotaExceeded("subscriptions", limit)
        sub = Subscriber(
            id=os.urandom(16).hex(),
            name=name,
            peer=peer,
            deadline=min(deadline or DEFAULT_DEADLINE, self.max_deadline),
            may_veto=self.policy.may_veto(peer),
        )
        self.subscribers[sub.id] = sub
        self.by_owner.setdefault(peer.uid, {})[name] = sub
        self._note(name, peer, limit)
        if (name, peer.uid) in self.expected_back:
            self.expected_back.discard((name, peer.uid))
            sub.send(Event(Phase.resumed, sub.id, kexec_count=kexec_count, sessions=sessions))
        else:
            sub.send(Event(Phase.subscribed, sub.id, kexec_count=kexec_count))
        log.info(
            "subscribed",
            subscriber=name,
            subscription=sub.id,
            owner=peer.describe(),
            deadline=sub.deadline,
            may_veto=sub.may_veto,
        )
        return sub

    def _note(self, name: str, peer: Peer, limit: int) -> None:
        noted = self._noted.setdefault(peer.uid, set())
        if self.on_subscribe is None or name in noted:
            return
        if len(noted) >= limit:
            log.warning(
                "subscriber-not-remembered",
                subscriber=name,
                owner=peer.describe(),
                reason=f"this uid subscribed under {limit} other names already; "
                "it is not told 'resumed' under this one after the kexec",
            )
            return
        noted.add(name)
        self.on_subscribe(name, peer.uid)

    def unsubscribe(self, sub: Subscriber, why: str) -> None:
        if self.subscribers.pop(sub.id, None) is None:
            return
        mine = self.by_owner.get(sub.peer.uid, {})
        if mine.get(sub.name) is sub:
            del mine[sub.name]
            if not mine:
                del self.by_owner[sub.peer.uid]
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

    def last_outcome_for(self, peer: Peer) -> Outcome | None:
        """The last update's outcome as `peer` may see it: who stopped it
        and why only for root and for the uid of the subscriber that did."""
        o = self.last_outcome
        if o is None or peer.is_root or o.who_uid is None or o.who_uid == peer.uid:
            return o
        return dataclasses.replace(o, who=None, reason=STOPPED_BY_ANOTHER_USER, overridden=[])

    def visible_to(self, peer: Peer) -> list[Subscriber]:
        """The subscribers `peer` may see: root all, anyone else its own."""
        if peer.is_root:
            return list(self.subscribers.values())
        return list(self.by_owner.get(peer.uid, {}).values())

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
        said = None if reason is None else shown(reason, REASON_SHOWN)
        if refuse:
            sub.state = "refused"
            sub.refusal = said or "no reason given"
        else:
            sub.state = f"acked-{phase.value}"
        # Root may answer for another uid's subscriber: the line says who
        # answered, and (`for`) that it was not the subscriber's owner.
        acting = {"for": sub.peer.uid} if peer.uid != sub.peer.uid else {}
        log.info(
            "acknowledged",
            subscriber=sub.name,
            owner=sub.peer.describe(),
            by=peer.describe(),
            update=update,
            phase=phase.value,
            refused=refuse,
            reason=said or "-",
            **acting,
        )
        self._changed.set()

    # --- the update ----------------------------------------------------------

    async def run(self, jump: Callable[[], Awaitable[None]], force: bool = False) -> Outcome:
        """prepare → freeze → jump, with the barrier after each phase.
        `force`: go on past every refusal, timeout and departure."""
        if self.running is not None:
            raise errors.UpdateInProgress(self.running)
        self.update_id += 1
        update = self.update_id
        self.running = update
        outcome = Outcome(update, ok=False)
        participants = list(self.subscribers.values())
        log.info("update-started", update=update, subscribers=len(participants), forced=force)
        try:
            for phase in (Phase.prepare, Phase.freeze):
                t0 = time.monotonic()
                failure = await self._phase(update, phase, participants, force, outcome)
                outcome.phases[phase.value] = time.monotonic() - t0
                log.info(
                    "phase-done",
                    update=update,
                    phase=phase.value,
                    seconds=round(outcome.phases[phase.value], 4),
                    ok=failure is None,
                )
                if failure is not None:
                    who, outcome.reason = failure
                    outcome.who, outcome.who_uid = who.name, who.peer.uid
                    self._abort(update, outcome)
                    return outcome
                # Gone for good: not told freeze (their going was overridden).
                participants = [s for s in participants if s.id in self.subscribers]
            log.info(
                "barrier-passed",
                update=update,
                overridden=len(outcome.overridden),
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

    def _objection(self, s: Subscriber, phase: Phase) -> str | None:
        """Why `s` holds the phase up, if it refused or went away."""
        if s.state == "gone" or s.id not in self.subscribers:
            return f"disconnected during {phase.value}"
        if s.state == "refused":
            return f"refused {phase.value}: {s.refusal}"
        return None

    def _stops(
        self, update: int, phase: Phase, s: Subscriber, reason: str, force: bool, outcome: Outcome
    ) -> bool:
        """Whether `s`'s refusal (timeout, departure) aborts the update; if
        not, it is logged with who and why, and the update goes on."""
        if s.may_veto and not force:
            return True
        outcome.overridden.append(f"{s.name} (uid {s.peer.uid}): {reason}")
        log.warning(
            "refusal-overridden",
            update=update,
            phase=phase.value,
            subscriber=s.name,
            owner=s.peer.describe(),
            reason=reason,
            because="the update is forced" if force else "this subscriber may not stop updates",
        )
        return False

    async def _phase(
        self,
        update: int,
        phase: Phase,
        participants: list[Subscriber],
        force: bool,
        outcome: Outcome,
    ) -> tuple[Subscriber, str] | None:
        now = self.clock()
        loop_now = asyncio.get_running_loop().time()
        ends: dict[str, float] = {}
        # Those whose refusal, timeout or departure was overridden: the
        # phase no longer waits for them.
        done: set[str] = set()
        for s in participants:
            if s.id not in self.subscribers:
                left = "disconnected before the update"
                if self._stops(update, phase, s, left, force, outcome):
                    return s, left
                done.add(s.id)
                continue
            s.state = phase.value
            s.send(Event(phase, s.id, update=update, deadline=now + s.deadline))
            ends[s.id] = loop_now + s.deadline
        while True:
            for s in participants:
                if s.id in done:
                    continue
                why = self._objection(s, phase)
                if why is not None:
                    if self._stops(update, phase, s, why, force, outcome):
                        return s, why
                    done.add(s.id)
            pending = [
                s for s in participants if s.id not in done and (update, phase) not in s.acked
            ]
            if not pending:
                return None
            t = asyncio.get_running_loop().time()
            for s in pending:
                if ends[s.id] <= t:
                    late = f"did not acknowledge {phase.value} within {s.deadline:g}s"
                    if self._stops(update, phase, s, late, force, outcome):
                        return s, late
                    done.add(s.id)
            pending = [s for s in pending if s.id not in done]
            if not pending:
                return None
            self._changed.clear()
            timeout = min(ends[s.id] for s in pending) - t
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    def _abort(self, update: int, outcome: Outcome) -> None:
        self.last_outcome = outcome
        log.warning("update-aborted", update=update, subscriber=outcome.who, reason=outcome.reason)
        said = f"{outcome.who}: {outcome.reason}"
        for s in self.subscribers.values():
            # Who refused and why is told to root and to the refuser's own
            # uid; another user learns only that the update was stopped.
            mine = outcome.who_uid is None or s.peer.is_root or s.peer.uid == outcome.who_uid
            reason = said if mine else STOPPED_BY_ANOTHER_USER
            s.send(Event(Phase.aborted, s.id, update=update, reason=reason))
