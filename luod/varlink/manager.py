"""io.luod.Manager: inspect and drive luod (status, checks, kernel, updates).

Each method reads or drives the three parts behind it: the Custodian
(luod.custody: what is held, the preflight check, reclaim), the
Orchestrator (luod.orchestrator: subscribers and the update barrier) and
NextKernel (luod.nextkernel: loading the next kernel and the jump). The
errors it declares are the catalogue's Manager entries (luod.errors).

This module deliberately does not use `from __future__ import annotations`:
asyncvarlink reads the method signatures at run time.
"""

import collections.abc
import typing

from asyncvarlink import VarlinkInterface, varlinkmethod

import luod
from luod import errors
from luod.custody import Custodian
from luod.interfaces import MANAGER
from luod.nextkernel import NextKernel
from luod.orchestrator import Orchestrator, Phase
from luod.peer import Peer
from luod.varlink.replies import refused, replies_of, reply, translating
from luod.varlink.transport import current
from luod.varlink.types import (
    CheckResult,
    Event,
    LoadedKernel,
    ReclaimInfo,
    StatusInfo,
    UpdateResult,
    event_info,
    loaded_kernel,
    opt_usec,
    problem_info,
    reclaim_info,
    subscriber_info,
    update_info,
    usec,
)


class ManagerInterface(VarlinkInterface, name=MANAGER):
    """Inspect and drive luod: status, the preflight check, reclaim after a
    kexec, and the kexec itself where no service manager does it."""

    errors = replies_of(MANAGER)

    def __init__(
        self, custodian: Custodian, orchestrator: Orchestrator, nextkernel: NextKernel
    ) -> None:
        self.custodian = custodian
        self.orchestrator = orchestrator
        self.nextkernel = nextkernel

    @varlinkmethod(return_parameter="status")
    @translating
    def GetStatus(self) -> StatusInfo:
        """What luod holds, and how it will carry it."""
        custodian, orch = self.custodian, self.orchestrator
        held = custodian.status()
        loaded = self.nextkernel.loaded
        return StatusInfo(
            version=luod.__version__,
            backend=custodian.backend.name,
            carrier=custodian.carrier.describe(),
            kexecCount=custodian.kexec_count,
            sessions=held.sessions,
            files=held.files,
            bytesPinned=held.bytes_pinned,
            graceSec=int(custodian.grace),
            nextReleaseUSec=opt_usec(custodian.next_deadline()),
            reclaim=None if custodian.reclaim is None else reclaim_info(custodian.reclaim),
            kernelLoaded=custodian.backend.kernel_loaded(),
            loadedKernel=None if loaded is None else loaded_kernel(loaded),
            subscribers=[subscriber_info(s) for s in orch.subscribers.values()],
            lastUpdate=None if orch.last_outcome is None else update_info(orch.last_outcome),
        )

    @varlinkmethod
    @translating
    def Check(self) -> CheckResult:
        """Preflight: what would be lost if the kexec happened now, and why."""
        problems = self.custodian.check()
        return {"ready": not problems, "problems": [problem_info(p) for p in problems]}

    @varlinkmethod(return_parameter="reclaim")
    @translating
    def Reclaim(self) -> ReclaimInfo:
        """Make sure everything the previous kernel carried was taken over.
        luod does this when it starts; this returns what it found. The
        boot-time luod-reclaim.service calls it to start luod early."""
        if self.custodian.reclaim is None:
            raise errors.NotReady("luod has not started its reclaim yet")
        return reclaim_info(self.custodian.reclaim)

    def _root(self, method: str) -> Peer:
        peer = current().peer
        if not peer.is_root:
            raise errors.RootRequired(method)
        return peer

    def _preflight(self, force: bool, own_reboot: bool) -> None:
        blocker = self.nextkernel.kexec_blocker(own_reboot)
        if blocker is not None:
            raise errors.NotReady(blocker)
        problems = self.custodian.check()
        if problems and not force:
            raise errors.PreflightFailed(
                len(problems), "; ".join(f"{p.session}: {p.reason}" for p in problems)
            )

    @varlinkmethod
    @translating
    def KExec(self, force: typing.Optional[bool] = None) -> None:  # noqa: UP045
        """Jump into the loaded kernel with reboot(LINUX_REBOOT_CMD_KEXEC) at
        once, without asking subscribers, for systems where no service
        manager does it. Root only. Refused when the preflight check finds
        problems, unless force is set. Update is the orderly way."""
        peer = self._root("KExec")
        self._preflight(bool(force), own_reboot=True)
        self.nextkernel.schedule_kexec(peer)

    @varlinkmethod(return_parameter="loaded")
    @translating
    def LoadKernel(
        self,
        kernel: str,
        initrd: typing.Optional[str] = None,  # noqa: UP045
        commandLine: typing.Optional[str] = None,  # noqa: UP045
        reuseCommandLine: typing.Optional[bool] = None,  # noqa: UP045
    ) -> LoadedKernel:
        """Check a kernel image (a readable kernel for this architecture)
        and load it with kexec_file_load(2), ready for Update. Root only."""
        self._root("LoadKernel")
        return loaded_kernel(
            self.nextkernel.load_kernel(kernel, initrd, commandLine, bool(reuseCommandLine))
        )

    @varlinkmethod
    @translating
    def UnloadKernel(self) -> None:
        """Undo LoadKernel. Root only."""
        self._root("UnloadKernel")
        self.nextkernel.unload_kernel()

    @varlinkmethod(return_parameter="event", delay_generator=False)
    async def Subscribe(
        self,
        name: str,
        deadlineSec: typing.Optional[float] = None,  # noqa: UP045
    ) -> collections.abc.AsyncIterator[Event]:
        """Follow live updates (call with more). The first event is
        subscribed, or resumed when this name was subscribed before the last
        kexec. Then, per update: prepare and freeze, each to be answered with
        Acknowledge within deadlineSec, or aborted with the reason."""
        ctx = current()
        try:
            sessions = [s.name for s in self.custodian.list_sessions(ctx.peer)]
            sub = self.orchestrator.subscribe(
                ctx.peer, name, deadlineSec, self.custodian.kexec_count, sessions
            )
        except errors.LuodError as e:
            raise refused("Subscribe", e) from None
        ctx.protocol.on_disconnect(lambda: self.orchestrator.unsubscribe(sub, "disconnected"))
        try:
            while (event := await sub.queue.get()) is not None:
                yield event_info(event)
        finally:
            self.orchestrator.unsubscribe(sub, "stream closed")
        raise reply(errors.SubscriptionEnded("the subscription ended"))

    @varlinkmethod
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
        aborted for everyone, with reason."""
        self.orchestrator.acknowledge(
            current().peer, subscription, update, phase, bool(refuse), reason
        )

    @varlinkmethod
    async def Update(self, force: typing.Optional[bool] = None) -> UpdateResult:  # noqa: UP045
        """The live update: preflight check, prepare, freeze, then the kexec
        (through PID 1 under systemd, else luod's own reboot). Returns once
        the barrier passed and the kexec is under way. Root only."""
        try:
            self._root("Update")
            self._preflight(bool(force), own_reboot=False)
            outcome = await self.orchestrator.run(self.nextkernel.jump)
        except errors.LuodError as e:
            raise refused("Update", e) from None
        if not outcome.ok:
            # Not a refusal: the orchestrator logged the abort, who and why.
            raise reply(
                errors.UpdateAborted(outcome.update, outcome.who or "", outcome.reason or "")
            )
        return {
            "update": outcome.update,
            "prepareUSec": usec(outcome.phases["prepare"]),
            "freezeUSec": usec(outcome.phases["freeze"]),
        }
