"""luod on the fake kernel: the test entry point.

Production luod knows only the real kernel. Tests start it through here:

    python -m testsupport.luod_fake --fake-kernel PATH [luod arguments...]

(with testsupport.crashhook's LUOD_TEST_CRASH_AT) which builds a `FakeBackend` on the fake kernel server at PATH (see
testsupport.fakekernel) and runs `luod.daemon.main` with it; every other
argument is luod's own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from luod import daemon
from testsupport.crashhook import install_from_env
from testsupport.fakekernel import FakeBackend


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testsupport.luod_fake",
        description="luod on the fake kernel; other arguments go to luod",
        add_help=False,  # --help is luod's
    )
    parser.add_argument(
        "--fake-kernel", metavar="PATH", required=True, help="socket of the fake kernel"
    )
    ours, theirs = parser.parse_known_args(argv)
    install_from_env()
    return daemon.main(theirs, backend=FakeBackend(ours.fake_kernel))


if __name__ == "__main__":
    sys.exit(main())
