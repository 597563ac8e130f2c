"""luod on the real kernel with the fault-injection hook: a test entry point.

    LUOD_TEST_CRASH_AT=STEP[:N] python3 -m testsupport.luod_crashable [luod arguments...]

is luod itself (luod.daemon.main) with testsupport.crashhook installed; the
VM and systemd tiers run it where a test kills luod at a named step.
"""

from __future__ import annotations

import sys

from luod import daemon
from testsupport.crashhook import install_from_env


def main() -> int:
    install_from_env()
    return daemon.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
