"""A carrier for the custody unit tests: the state-session carrier on the
fake kernel, with every call that changes what survives written down in
order, and its problems and its `holds_after_exit` set by the test."""

from __future__ import annotations

from collections.abc import Sequence

from luod.carriers import CarrierProblem, IncomingState
from luod.carriers.state_session import StateSessionCarrier
from luod.kernel.backend import Backend


class SpyCarrier:
    name = "spy"

    def __init__(self, backend: Backend, holds_after_exit: bool = False) -> None:
        self.inner = StateSessionCarrier(backend)
        self.holds_after_exit = holds_after_exit
        # ("save", "") / ("held", kernel name) / ("dropped", kernel name) / ("finish", "")
        self.calls: list[tuple[str, str]] = []
        self.extra_problems: list[CarrierProblem] = []

    def load(self) -> IncomingState | None:
        return self.inner.load()

    def retrieve_session(self, kernel_name: str) -> int:
        return self.inner.retrieve_session(kernel_name)

    def finish_incoming(self) -> None:
        self.calls.append(("finish", ""))
        self.inner.finish_incoming()

    def save(self, payload: bytes) -> None:
        self.calls.append(("save", ""))
        self.inner.save(payload)

    def append(self, record: bytes) -> bool:
        # Every change a save of its own: the tests count and order saves.
        return False

    def session_held(self, kernel_name: str, fd: int) -> None:
        self.calls.append(("held", kernel_name))
        self.inner.session_held(kernel_name, fd)

    def session_dropped(self, kernel_name: str) -> None:
        self.calls.append(("dropped", kernel_name))
        self.inner.session_dropped(kernel_name)

    def settle(self, timeout: float) -> None:
        self.calls.append(("settle", ""))

    def keep_files(self, kernel_name: str, refs: Sequence[tuple[int, int]]) -> None:
        tokens = ",".join(str(token) for token, _fd in refs)
        self.calls.append(("keep", f"{kernel_name}:{tokens}"))

    def release_files(self, kernel_name: str) -> None:
        self.calls.append(("release", kernel_name))

    def kept_files(self, kernel_name: str) -> dict[int, int]:
        return {}

    def release_unclaimed(self) -> None:
        self.calls.append(("unclaimed", ""))

    def intend(self, payload: bytes) -> None:
        self.calls.append(("intend", payload.decode()))

    def problems(self) -> list[CarrierProblem]:
        return self.inner.problems() + self.extra_problems

    def describe(self, counts: bool = True) -> str:
        return "spy on " + self.inner.describe(counts)

    def close(self) -> None:
        self.inner.close()

    def saves(self) -> int:
        return sum(1 for op, _ in self.calls if op == "save")
