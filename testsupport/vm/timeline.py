"""Host-side timestamps of guest events, for `make demo` and `make bench`.

A guest clock cannot time a kexec: CLOCK_MONOTONIC and /proc/uptime start
again at zero in the next kernel, and CLOCK_REALTIME is set again from the
CMOS RTC, which has a resolution of one second. So durations that span a
kexec are measured on the HOST:

- in the guest, `mark(name, **data)` writes `events/<stage>-<name>.json`
  into the results share (write, fsync, rename: it is on the host's disk,
  whole, when mark() returns);
- on the host, `Timeline.run_guest()` runs qemu.run_guest() in a thread and
  polls `events/` and init's `.guest/stage-N.started` every POLL seconds,
  stamping each file with the host's monotonic clock when it first appears.

A stamp is late by the 9p write of the marker (a few ms under TCG) plus at
most one poll interval, so a difference of two stamps is good to about
+-0.02 s (PRECISION).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import guestlib, qemu

EVENTS = "events"
POLL = 0.01
PRECISION = 0.02  # seconds, either way, for a difference of two host stamps
CLOCK_NOTE = (
    "host clock (monotonic), markers polled every 10 ms over the 9p results share: "
    "a difference of two stamps is good to +-0.02 s"
)


# --- guest side ---------------------------------------------------------------


def mark(name: str, **data: Any) -> None:
    """Record event `name` of this stage for the host to stamp (guest side).

    Names are unique per stage. `data` must be JSON-serializable."""
    results = guestlib.results_dir()
    stage = guestlib.stage()
    record = {
        "name": name,
        "stage": stage,
        "pid": os.getpid(),
        "uptime": guestlib.uptime(),
        "monotonic": time.monotonic(),
        **data,
    }
    folder = results / EVENTS
    path = folder / f"{stage}-{name}.json"
    tmp = folder / f".{stage}-{name}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- host side ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Event:
    """One guest event, stamped by the host.

    `name` is the guest's mark() name, or "init" for init reaching a stage
    (then data["uptime"] is the guest's uptime when init ran)."""

    stage: int
    name: str
    seen: float  # host seconds since the timeline started (QEMU start)
    data: Mapping[str, Any]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


class Timeline:
    """Events of one guest run, in the order the host saw them."""

    def __init__(self, results: Path, on_event: Callable[[Event], None] | None = None) -> None:
        self.results = results.resolve()
        self.on_event = on_event
        self.events: dict[tuple[int, str], Event] = {}
        self._init_pending: dict[int, float] = {}  # stage -> seen; file not written yet
        self.start = 0.0

    # --- lookups ---

    def get(self, stage: int, name: str) -> Event | None:
        return self.events.get((stage, name))

    def __getitem__(self, key: tuple[int, str]) -> Event:
        ev = self.events.get(key)
        if ev is None:
            raise KeyError(f"the guest never marked stage {key[0]} event '{key[1]}'")
        return ev

    def between(self, a: tuple[int, str], b: tuple[int, str]) -> float:
        """Host seconds from event a to event b."""
        return self[b].seen - self[a].seen

    # --- saved timelines ---

    def save(self, name: str = "timeline.json") -> Path:
        """Every event with its host stamp, into the results folder."""
        path = self.results / name
        rows = [dataclasses.asdict(ev) for ev in self.events.values()]
        path.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, results: Path, name: str = "timeline.json") -> Timeline:
        """A timeline saved by save(), to analyse a run again."""
        tl = cls(results)
        for row in json.loads((tl.results / name).read_text()):
            ev = Event(int(row["stage"]), str(row["name"]), float(row["seen"]), row["data"])
            tl.events[(ev.stage, ev.name)] = ev
        return tl

    # --- the run ---

    def run_guest(
        self,
        kernel: Path,
        script: Path | str,
        timeout: float,
        *,
        guest_env: Mapping[str, str] | None = None,
        extra_cmdline: Sequence[str] = (),
        memory: str = "1G",
        smp: int = 2,
        one_thread: bool = True,
    ) -> qemu.GuestResult:
        """qemu.run_guest(), with every event stamped (and handed to
        on_event, in this thread) while it runs."""
        folder = self.results / EVENTS
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        # run_guest starts afresh too, but only once its thread runs: what an
        # earlier run in this folder left must not be stamped as this run's.
        shutil.rmtree(self.results / ".guest", ignore_errors=True)
        outcome: list[qemu.GuestResult | BaseException] = []

        def target() -> None:
            try:
                outcome.append(
                    qemu.run_guest(
                        kernel,
                        script,
                        self.results,
                        timeout,
                        guest_env=guest_env,
                        extra_cmdline=extra_cmdline,
                        memory=memory,
                        smp=smp,
                        one_thread=one_thread,
                    )
                )
            except BaseException as e:
                outcome.append(e)

        self.start = time.monotonic()
        thread = threading.Thread(target=target, name="qemu", daemon=True)
        thread.start()
        while thread.is_alive():
            self._poll()
            thread.join(POLL)
        self._poll()
        self._flush_init(final=True)
        self.save()
        got = outcome[0]
        if isinstance(got, BaseException):
            raise got
        return got

    def _poll(self) -> None:
        now = time.monotonic() - self.start
        guest_dir = self.results / ".guest"
        try:
            names = os.listdir(guest_dir)
        except FileNotFoundError:
            names = []
        for n in names:
            if n.startswith("stage-") and n.endswith(".started"):
                stage = int(n[len("stage-") : -len(".started")])
                if (stage, "init") not in self.events:
                    self._init_pending.setdefault(stage, now)
        self._flush_init(final=False)
        fresh: list[Event] = []
        for n in os.listdir(self.results / EVENTS):
            if n.startswith(".") or not n.endswith(".json"):
                continue
            stage_text, _, name = n[: -len(".json")].partition("-")
            key = (int(stage_text), name)
            if key in self.events:
                continue
            try:
                data = json.loads((self.results / EVENTS / n).read_text())
            except (OSError, ValueError):
                continue  # renamed into place, so only on a torn read: next poll
            fresh.append(Event(key[0], name, now, data))
        # Seen in the same poll: the guest's own clock orders them.
        fresh.sort(key=lambda e: (e.stage, float(e.data.get("monotonic", 0.0))))
        for ev in fresh:
            self._add(ev)

    def _flush_init(self, final: bool) -> None:
        for stage, seen in sorted(self._init_pending.items()):
            path = self.results / ".guest" / f"stage-{stage}.started"
            try:
                text = path.read_text().strip()
            except OSError:
                text = ""
            if not text and not final:
                continue  # init writes it with echo: seen before it is filled
            try:
                uptime = float(text)
            except ValueError:
                uptime = float("nan")
            del self._init_pending[stage]
            self._add(Event(stage, "init", seen, {"uptime": uptime}))

    def _add(self, ev: Event) -> None:
        self.events[(ev.stage, ev.name)] = ev
        if self.on_event is not None:
            self.on_event(ev)
