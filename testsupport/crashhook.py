"""The fault-injection hook of the test entry points.

    LUOD_TEST_CRASH_AT=STEP[:N]

makes luod kill itself (SIGKILL, as the OOM killer or a `kill -9` would)
the Nth time (default 1) it reaches STEP of luod.crashpoint.STEPS. Only the
test entry points (testsupport.luod_fake, testsupport.luod_crashable) call
install_from_env(); the luod entry point never does.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping

from luod import crashpoint

ENV = "LUOD_TEST_CRASH_AT"


def install_from_env(environ: Mapping[str, str] | None = None) -> None:
    env = os.environ if environ is None else environ
    spec = env.get(ENV, "")
    if not spec:
        return
    step, _, nth = spec.partition(":")
    if step not in crashpoint.STEPS:
        raise SystemExit(f"{ENV}={spec}: unknown step (known: {', '.join(crashpoint.STEPS)})")
    left = int(nth or "1")

    def hook(reached: str) -> None:
        nonlocal left
        if reached != step:
            return
        left -= 1
        if left == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    crashpoint.HOOK = hook
