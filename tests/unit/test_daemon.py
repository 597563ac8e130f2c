"""luod.daemon: the command line (durations, choices, defaults) and the
little the wiring decides itself (the boot identity)."""

from __future__ import annotations

import argparse
import errno
from typing import cast

import pytest

from luod import daemon, servicemanager
from luod.interfaces import DEFAULT_SOCKET
from luod.kernel.backend import Backend
from testsupport.util import fresh_python


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("600", 600.0),
        ("0", 0.0),
        ("1.5s", 1.5),
        ("30sec", 30.0),
        ("10min", 600.0),
        ("2m", 120.0),
        ("2h", 7200.0),
        ("250ms", 0.25),
        ("500us", 0.0005),
        (" 5 min ", 300.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert daemon.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "ten", "-1", "5d", "1.s", "min", "1e3"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="is not a duration"):
        daemon.parse_duration(text)


def test_defaults() -> None:
    args = daemon.build_parser().parse_args([])
    assert args.socket == DEFAULT_SOCKET
    assert args.grace == 600.0
    assert args.carrier == "auto"
    assert args.service_manager == servicemanager.MANAGER_SOCKET
    assert (args.log_level, args.log_format) == ("info", "logfmt")


def test_options() -> None:
    args = daemon.build_parser().parse_args(
        [
            "--socket=/tmp/x",
            "--grace=1min",
            "--carrier=fdstore",
            "--service-manager=/tmp/m",
            "--log-level=debug",
            "--log-format=json",
        ]
    )
    assert args.socket == "/tmp/x"
    assert args.grace == 60.0
    assert args.carrier == "fdstore"
    assert args.service_manager == "/tmp/m"
    assert (args.log_level, args.log_format) == ("debug", "json")


@pytest.mark.parametrize("carrier", ["auto", "state-session", "fdstore"])
def test_carrier_choices(carrier: str) -> None:
    assert daemon.build_parser().parse_args([f"--carrier={carrier}"]).carrier == carrier


@pytest.mark.parametrize(
    "argv",
    [
        ["--grace=soon"],
        ["--carrier=floppy"],
        ["--log-level=trace"],
        ["--log-format=xml"],
        # The fake kernel is the tests' (testsupport.luod_fake), not luod's.
        ["--backend=fake"],
        ["--fake-kernel=/tmp/k"],
    ],
)
def test_refused_options(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        daemon.build_parser().parse_args(argv)
    assert e.value.code == 2
    assert "luod: error:" in capsys.readouterr().err


def test_help_never_mentions_the_fake_kernel(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        daemon.build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: luod ")
    assert "fake" not in out and "--backend" not in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        daemon.build_parser().parse_args(["--version"])
    assert capsys.readouterr().out.startswith("luod ")


class _BootId:
    def __init__(self, answer: str | OSError) -> None:
        self.answer = answer

    def boot_id(self) -> str:
        if isinstance(self.answer, OSError):
            raise self.answer
        return self.answer


def test_boot_identity_is_the_backends() -> None:
    assert daemon.boot_identity(cast(Backend, _BootId("abc+fake-kexec-2"))) == "abc+fake-kexec-2"


def test_boot_identity_unreadable_is_never_the_same_boot() -> None:
    failing = _BootId(OSError(errno.ENOENT, "No such file or directory"))
    assert daemon.boot_identity(cast(Backend, failing)) == ""


def test_luods_start_imports_only_what_it_needs() -> None:
    """Modules luod's start does without (issue 12, goal 2; counted with
    callgrind, Python 3.11): structlog (68 M of 562 M instructions of
    imports; luod writes its lines itself), pathlib with urllib.parse and
    ipaddress (17 M; luod.config uses os.path), ctypes (7 M; fdinfo loads
    it at the first fstatfs())."""
    code = (
        "import io, logging, sys, luod.daemon, luod.log;"
        "luod.log.setup('info', stream=io.StringIO());"
        "luod.log.get_logger().info('listening', socket='/run/luod/io.luod');"
        "logging.getLogger('asyncvarlink').warning('x');"
        "luod.daemon.build_parser().parse_args([]);"
        "print(sorted(m for m in ('structlog', 'pathlib', 'ctypes') if m in sys.modules))"
    )
    assert fresh_python(code) == "[]\n"


def test_luods_start_builds_methods_and_wire_types_when_first_needed() -> None:
    """Issue 12, goal 2: asyncvarlink's build of each method (its
    signature's conversions, 1 M instructions a method) and luod's wire
    types (luod.varlink.types) wait for the first lookup of a method; a
    record's __init__ for its first instance."""
    code = (
        "import sys, luod.daemon, luod.model;"
        "from luod.varlink.custody import CustodyInterface as C;"
        "from luod.varlink.manager import ManagerInterface as M;"
        "lazy = lambda: sorted(n for i in (C, M) for n, v in vars(i).items()"
        " if type(v).__name__ == '_LazyMethod');"
        "wire = lambda: type(sys.modules['luod.varlink.types']).__name__;"
        "made = lambda c: '_init_on_first_use' not in c.__init__.__qualname__;"
        "print(len(lazy()), wire(), made(luod.model.HeldFile));"
        "C.PreserveFd;"
        "print(len(lazy()), 'PreserveFd' in lazy(), wire());"
        "luod.model.HeldFile('a', 1, 0, 0.0, -1);"
        "print(made(luod.model.HeldFile))"
    )
    assert fresh_python(code) == "19 _LazyModule False\n18 False module\nTrue\n"
