"""io.luod.Manager: inspect and drive luod (status, checks, kernel, updates).

Each method reads or drives the three parts behind it: the Custodian
(luod.custody: what is held, the preflight check, reclaim), the
Orchestrator (luod.orchestrator: subscribers and the update barrier) and
NextKernel (luod.nextkernel: loading the next kernel and the jump). The
errors it declares are the catalogue's Manager entries (luod.errors).

The methods' annotations are evaluated when a method is first looked up
(lazy_varlinkmethod), and the wire types imported then (luod.lazyimport).
"""

from __future__ import annotations

import collections.abc
import typing

from asyncvarlink import VarlinkInterface

import luod
from luod import errors
from luod.crashcost import crash_cost
from luod.custody import Custodian, ReclaimReport
from luod.interfaces import MANAGER
from luod.lazyimport import lazy_module
from luod.nextkernel import NextKernel
from luod.orchestrator import Orchestrator, Phase
from luod.peer import Peer
from luod.preflight import Problem
from luod.varlink.replies import refused, replies_of, reply, translating
from luod.varlink.transport import current, declaring_errors, lazy_varlinkmethod

if typing.TYPE_CHECKING:
    from luod.varlink import types as wire
else:
    # Imported when a method is first built or called (luod.lazyimport).
    wire = lazy_module("luod.varlink.types")


@declaring_errors(replies_of(MANAGER))
class ManagerInterface(VarlinkInterface, name=MANAGER):
    """Inspect and drive luod: status, the preflight check, reclaim after a
    kexec, and the kexec itself where no service manager does it."""

    def __init__(
        self, custodian: Custodian, orchestrator: Orchestrator, nextkernel: NextKernel
    ) -> None:
        self.custodian = custodian
        self.orchestrator = orchestrator
        self.nextkernel = nextkernel

    @lazy_varlinkmethod(return_parameter="status")
    @translating
    def GetStatus(self) -> wire.StatusInfo:
        """What luod holds, how it will carry it, and what a crash of luod
        now would release (crashCost). Root is told about everyone; anyone
        else about its own sessions, files and bytes, its own subscribers
        and what of its own came over the kexec."""
        custodian, orch = self.custodian, self.orchestrator
        peer = current().peer
        # Another uid's holdings are not a non-root caller's business.
        whose = None if peer.is_root else peer.uid
        held = custodian.status(whose)
        report = self._reclaim_seen_by(peer)
        loaded = self.nextkernel.loaded
        return wire.StatusInfo(
            version=luod.__version__,
            backend=custodian.backend.name,
            carrier=custodian.carrier.describe(counts=peer.is_root),
            kexecCount=custodian.kexec_count,
            sessions=held.sessions,
            files=held.files,
            bytesPinned=held.bytes_pinned,
            crashCost=wire.crash_cost_info(crash_cost(custodian.ledger, whose)),
            graceSec=int(custodian.grace),
            nextReleaseUSec=wire.opt_usec(custodian.next_deadline(whose)),
            reclaim=None if report is None else wire.reclaim_info(report),
            kernelLoaded=custodian.backend.kernel_loaded(),
            loadedKernel=None if loaded is None else wire.loaded_kernel(loaded),
            # Root sees every subscriber, anyone else its own.
            subscribers=[wire.subscriber_info(s) for s in orch.visible_to(peer)],
            lastUpdate=None
            if (last := orch.last_outcome_for(peer)) is None
            else wire.update_info(last),
        )

    @lazy_varlinkmethod()
    @translating
    def Check(self) -> wire.CheckResult:
        """Preflight: what would be lost if the kexec happened now, and why
        (to anyone but root: what concerns its own sessions or all).
        crashCost: what a crash of luod now would release, and why."""
        peer = current().peer
        whose = None if peer.is_root else peer.uid
        problems = self.custodian.check(whose) + self._next_kernel_problems()
        return {
            "ready": not problems,
            "problems": [wire.problem_info(p) for p in problems],
            "crashCost": wire.crash_cost_info(crash_cost(self.custodian.ledger, whose)),
        }

    def _next_kernel_problems(self) -> list[Problem]:
        """The loaded kernel cannot take the handover (luod.nextkernel)."""
        return [Problem("", None, reason) for reason in self.nextkernel.problems()]

    @lazy_varlinkmethod(return_parameter="reclaim")
    @translating
    def Reclaim(self) -> wire.ReclaimInfo:
        """Make sure everything the previous kernel carried was taken over.
        luod does this when it starts; this returns what it found (to
        anyone but root: what of its own). The boot-time
        luod-reclaim.service calls it to start luod early."""
        report = self._reclaim_seen_by(current().peer)
        if report is None:
            raise errors.NotReady("luod has not started its reclaim yet")
        return wire.reclaim_info(report)

    def _reclaim_seen_by(self, peer: Peer) -> ReclaimReport | None:
        """What luod's start took over, as `peer` may see it: root all of
        it, anyone else its own sessions, files and losses."""
        report = self.custodian.reclaim
        if report is None or peer.is_root:
            return report
        return report.for_uid(peer.uid)

    def _root(self, method: str) -> Peer:
        peer = current().peer
        if not peer.is_root:
            raise errors.RootRequired(method)
        return peer

    def _preflight(self, force: bool, own_reboot: bool) -> None:
        blocker = self.nextkernel.kexec_blocker(own_reboot)
        if blocker is not None:
            raise errors.NotReady(blocker)
        next_kernel = self._next_kernel_problems()
        problems = self.custodian.check() + next_kernel
        if problems and not force:
            raise errors.PreflightFailed(
                len(problems), "; ".join(f"{p.session}: {p.reason}" for p in problems)
            )
        if next_kernel:
            self.nextkernel.log_forced([p.reason for p in next_kernel])

    @lazy_varlinkmethod()
    @translating
    def KExec(self, force: typing.Optional[bool] = None) -> None:  # noqa: UP045
        """Jump into the loaded kernel with reboot(LINUX_REBOOT_CMD_KEXEC) at
        once, without asking subscribers, for systems where no service
        manager does it. Root only. Refused when the preflight check finds
        problems, unless force is set. Update is the orderly way."""
        peer = self._root("KExec")
        self._preflight(bool(force), own_reboot=True)
        self.nextkernel.schedule_kexec(peer)

    @lazy_varlinkmethod(return_parameter="loaded")
    @translating
    def LoadKernel(
        self,
        kernel: str,
        initrd: typing.Optional[str] = None,  # noqa: UP045
        commandLine: typing.Optional[str] = None,  # noqa: UP045
        reuseCommandLine: typing.Optional[bool] = None,  # noqa: UP045
        force: typing.Optional[bool] = None,  # noqa: UP045
    ) -> wire.LoadedKernel:
        """Check a kernel image (a readable kernel for this architecture, or
        a UKI: its .linux, .initrd and .cmdline, unless initrd or
        commandLine is given) and whether it can take the handover (its
        command line has kho=on and liveupdate=on; it speaks the running
        kernel's LUO ABI and memfd handler), then load it with
        kexec_file_load(2), ready for Update. Root only. force loads a
        kernel that cannot take the handover (logged)."""
        self._root("LoadKernel")
        return wire.loaded_kernel(
            self.nextkernel.load_kernel(
                kernel, initrd, commandLine, bool(reuseCommandLine), bool(force)
            )
        )

    @lazy_varlinkmethod()
    @translating
    def UnloadKernel(self) -> None:
        """Undo LoadKernel. Root only."""
        self._root("UnloadKernel")
        self.nextkernel.unload_kernel()

    @lazy_varlinkmethod(return_parameter="event", delay_generator=False)
    async def Subscribe(
        self,
        name: str,
        deadlineSec: typing.Optional[float] = None,  # noqa: UP045
    ) -> collections.abc.AsyncIterator[wire.Event]:
        """Follow live updates (call with more). The first event is
        subscribed, or resumed when the caller's uid subscribed under this
        name before the last kexec. Then, per update: prepare and freeze,
        each to be answered with Acknowledge within deadlineSec, or aborted
        with the reason. Names are per uid; each uid may hold a limited
        number of subscriptions (luod's --max-subscriptions-per-user). Any
        uid may subscribe; only root's subscribers and those of the uids
        luod's --update-veto names can stop an update."""
        ctx = current()
        try:
            sessions = [s.name for s in self.custodian.list_sessions(ctx.peer, owner=ctx.peer.uid)]
            sub = self.orchestrator.subscribe(
                ctx.peer, name, deadlineSec, self.custodian.kexec_count, sessions
            )
        except errors.LuodError as e:
            raise refused("Subscribe", e) from None
        ctx.protocol.on_disconnect(lambda: self.orchestrator.unsubscribe(sub, "disconnected"))
        try:
            while (event := await sub.queue.get()) is not None:
                yield wire.event_info(event)
        finally:
            self.orchestrator.unsubscribe(sub, "stream closed")
        raise reply(errors.SubscriptionEnded("the subscription ended"))

    @lazy_varlinkmethod()
    @translating
    def Acknowledge(
        self,
        subscription: str,
        update: int,
        phase: Phase,
        refuse: typing.Optional[bool] = None,  # noqa: UP045
        reason: typing.Optional[str] = None,  # noqa: UP045
    ) -> None:
        """Answer prepare or freeze of an update. With refuse, the update is
        aborted for everyone, with reason, if this subscriber may stop
        updates (root's, or of a uid luod's --update-veto names) and the
        update is not forced; else luod logs the refusal and goes on."""
        self.orchestrator.acknowledge(
            current().peer, subscription, update, phase, bool(refuse), reason
        )

    @lazy_varlinkmethod()
    async def Update(self, force: typing.Optional[bool] = None) -> wire.UpdateResult:  # noqa: UP045
        """The live update: preflight check, prepare, freeze, then the kexec
        (through PID 1 under systemd, else luod's own reboot). Returns once
        the barrier passed and the kexec is under way. Root only. force goes
        on past the preflight check's problems and past every subscriber's
        refusal, missed deadline or departure (each logged, who and why).
        overridden lists what the update went on past."""
        try:
            self._root("Update")
            self._preflight(bool(force), own_reboot=False)
            outcome = await self.orchestrator.run(self.nextkernel.jump, force=bool(force))
        except errors.LuodError as e:
            raise refused("Update", e) from None
        if not outcome.ok:
            # Not a refusal: the orchestrator logged the abort, who and why.
            raise reply(
                errors.UpdateAborted(outcome.update, outcome.who or "", outcome.reason or "")
            )
        return {
            "update": outcome.update,
            "prepareUSec": wire.usec(outcome.phases["prepare"]),
            "freezeUSec": wire.usec(outcome.phases["freeze"]),
            "overridden": outcome.overridden,
        }
