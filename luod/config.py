"""luod's configuration files, read the way systemd reads its own.

    /etc/luod/luod.conf            the administrator's
    /run/luod/luod.conf            runtime (generated)
    /usr/local/lib/luod/luod.conf  local vendor defaults
    /usr/lib/luod/luod.conf        the package's defaults
    .../luod.conf.d/*.conf         drop-ins, in all four places

As in systemd (conf-files.c, `systemd-analyze cat-config`): of the main
file the first found in that order is read; then the drop-ins, by file
name, a name in an earlier directory hiding the same name in a later one
(so /etc/luod/luod.conf.d/50-x.conf replaces /usr/lib/luod/luod.conf.d/
50-x.conf, and an empty file or a symlink to /dev/null masks it), all of
them sorted by file name across the directories. A later assignment wins;
an empty one (`Key=`) sets the option back to its built-in default. The
command line wins over every file.

The format is systemd's: a `[Luod]` section of `Key=value` lines, `#` and
`;` comments. Every luod option that has a flag is a key, named after the
flag in systemd's spelling (--max-connections-per-user: MaxConnectionsPerUser=),
so an option added to luod.daemon.build_parser() is a key at once. A value
is checked by the option's own parser; a bad one, an unknown key or a line
that is no assignment stops luod at start with the file and the line.

$LUOD_CONFIG_ROOT, when set, is put in front of every directory (tests).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator, Sequence

from luod.record import record

SECTION = "Luod"
NAME = "luod.conf"
DIRS = ("/etc/luod", "/run/luod", "/usr/local/lib/luod", "/usr/lib/luod")
ROOT_ENV = "LUOD_CONFIG_ROOT"

# Options that are no setting: asking for help or the version.
_NOT_KEYS = (argparse._HelpAction, argparse._VersionAction)


class ConfigError(Exception):
    """A configuration file luod cannot start with: where, and what."""


@record(frozen=True)
class Assignment:
    """One `key=value` of a configuration file, and where it was read."""

    key: str
    value: str
    where: str  # "file:line"


def key_name(flag: str) -> str:
    """'--max-connections-per-user' → 'MaxConnectionsPerUser'."""
    return "".join(part.capitalize() for part in flag.lstrip("-").split("-"))


def keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every option of the parser that may be set in a file, by key."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if isinstance(action, _NOT_KEYS):
            continue
        longs = [s for s in action.option_strings if s.startswith("--")]
        if longs:
            out[key_name(longs[0])] = action
    return out


# Paths are str and os.path here, not pathlib: luod reads these at every
# start, and pathlib (with urllib.parse and ipaddress, which it imports)
# was 17 M of the 494 M instructions of luod's imports (Python 3.11).


def search_dirs(root: str | None = None) -> list[str]:
    root = os.environ.get(ROOT_ENV, "") if root is None else root
    return [root + d if root else d for d in DIRS]


def files(root: str | None = None) -> list[str]:
    """The files to read, in the order they are applied."""
    dirs = search_dirs(root)
    out: list[str] = []
    main = next((p for p in (os.path.join(d, NAME) for d in dirs) if os.path.exists(p)), None)
    if main is not None:
        out.append(main)
    dropins: dict[str, str] = {}
    for d in dirs:
        dropin_dir = os.path.join(d, f"{NAME}.d")
        try:
            entries = sorted(os.listdir(dropin_dir))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in entries:
            if name.endswith(".conf") and name not in dropins:
                dropins[name] = os.path.join(dropin_dir, name)
    out.extend(dropins[name] for name in sorted(dropins))
    return out


def read(path: str) -> Iterator[Assignment]:
    """The assignments of one file, in order."""
    section: str | None = None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        where = f"{path}:{n}"
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise ConfigError(f"{where}: '{line}' is no section header (try [{SECTION}])")
            section = line[1:-1].strip()
            if section != SECTION:
                raise ConfigError(f"{where}: unknown section [{section}]; luod reads [{SECTION}]")
            continue
        key, eq, value = line.partition("=")
        if not eq:
            raise ConfigError(f"{where}: '{line}' is no Key=value assignment")
        if section is None:
            raise ConfigError(
                f"{where}: {key.strip()}= before any section; put [{SECTION}] above it"
            )
        yield Assignment(key.strip(), value.strip(), where)


def _convert(action: argparse.Action, a: Assignment) -> object:
    """The value of `a` as the command line would have given it."""
    if action.nargs == 0:  # a switch: store_true / store_false / store_const
        word = a.value.lower()
        if word in ("1", "yes", "true", "on"):
            return action.const
        if word in ("0", "no", "false", "off"):
            return action.default
        raise ConfigError(f"{a.where}: {a.key}={a.value}: not a boolean (yes or no)")
    conv: Callable[[str], object] = action.type if callable(action.type) else str
    try:
        value = conv(a.value)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
        raise ConfigError(f"{a.where}: {a.key}={a.value}: {e}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(f"{a.where}: {a.key}={a.value}: not one of {choices}")
    return value


def settings(parser: argparse.ArgumentParser, paths: Sequence[str]) -> dict[str, object]:
    """What the files set: option dest → value, checked by the parser's own types."""
    by_key = keys(parser)
    out: dict[str, object] = {}
    for path in paths:
        for a in read(path):
            action = by_key.get(a.key)
            if action is None:
                raise ConfigError(f"{a.where}: unknown key {a.key}= (luod --help lists the keys)")
            if a.value == "":  # systemd: an empty assignment resets
                out.pop(action.dest, None)
                continue
            value = _convert(action, a)
            if isinstance(action, argparse._AppendAction):
                held = out.get(action.dest)
                out[action.dest] = [*(held if isinstance(held, list) else []), value]
            else:
                out[action.dest] = value
    return out


def given(build: Callable[[], argparse.ArgumentParser], argv: Sequence[str] | None) -> set[str]:
    """The option dests the command line sets itself."""
    p = build()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def parse_args(
    build: Callable[[], argparse.ArgumentParser],
    argv: Sequence[str] | None = None,
    root: str | None = None,
) -> argparse.Namespace:
    """luod's options: built-in defaults, then the files, then the command line."""
    parser = build()
    args = parser.parse_args(argv)  # usage errors and --help before any file
    try:
        from_files = settings(parser, files(root))
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: {e}\n")
    if not from_files:
        # The usual start: no file sets anything, and what the command line
        # set itself need not be known (that takes a second parser: issue 12).
        return args
    on_command_line = given(build, argv)
    for dest, value in from_files.items():
        if dest not in on_command_line:
            setattr(args, dest, value)
    return args


def epilog(parser: argparse.ArgumentParser) -> str:
    """What `luod --help` says about the files."""
    names = ", ".join(f"{k}=" for k in keys(parser))
    return (
        f"Every option can also be set in {DIRS[0]}/{NAME} or a drop-in "
        f"{DIRS[0]}/{NAME}.d/*.conf (vendor defaults: the same under {DIRS[3]}; /run/luod "
        f"and /usr/local/lib/luod too), in a [{SECTION}] section; the command line wins. "
        f"Keys: {names}. See luod(8)."
    )
