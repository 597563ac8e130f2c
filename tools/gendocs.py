"""luod's man pages and luoctl's shell completion, rendered from the code.

    python -m tools.gendocs OUT      (make man)

writes OUT/man/luod.8, OUT/man/luoctl.1, OUT/man/luod.varlink.7 and
OUT/completion/luoctl (bash), OUT/completion/_luoctl (zsh) and the
package's /usr/lib/luod/luod.conf, OUT/luod.conf. The option
parts come from the argparse parsers themselves (luod.daemon.build_parser,
luod.cli.main.build_parser) through argparse-manpage and shtab, the
configuration keys from luod.config and the interfaces from the IDL luod
serves (luod.varlink.registry), so none of it can drift from the code;
tests/test_manpages.py checks the rendering. The Debian package installs
what this writes (debian/luod.manpages, debian/luod.bash-completion).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import shtab
from argparse_manpage.manpage import Manpage

import luod
from luod import config, daemon
from luod.cli.main import build_parser as luoctl_parser
from luod.varlink.registry import interface_descriptions

PROJECT = "luod"
URL = "https://github.com/luod-project/luod"


def _date() -> str:
    """Reproducible: $SOURCE_DATE_EPOCH (dpkg-buildpackage sets it) or today."""
    stamp = int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))
    return time.strftime("%Y-%m-%d", time.gmtime(stamp))


def _roff(text: str) -> str:
    """Plain text for a roff body: no line may start with a control character."""
    out = []
    for line in text.replace("\\", "\\e").splitlines():
        out.append("\\&" + line if line[:1] in (".", "'") else line)
    return "\n".join(out)


def _page(parser: argparse.ArgumentParser, section: int, short: str) -> Manpage:
    page = Manpage(
        parser,
        _data={
            "date": _date(),
            "project_name": PROJECT,
            "version": luod.__version__,
            "manual_section": section,
            "manual_title": "luod",
            "description": short,
            "url": URL,
        },
    )
    return page


def _config_section(parser: argparse.ArgumentParser) -> str:
    dirs = config.DIRS
    lines = [
        "luod reads its settings the way systemd reads its own configuration files. "
        f"Of the main file the first found of {', '.join(f'{d}/{config.NAME}' for d in dirs)} "
        "is read. Then the drop-ins, *.conf files in the luod.conf.d/ directory beside each of "
        "those, all sorted by file name; a file in an earlier directory hides one of the same "
        "name in a later one (an empty file or a symlink to /dev/null masks it). "
        f"{dirs[0]} is the administrator's, {dirs[3]} the package's defaults.",
        ".PP",
        f"The files hold a [{config.SECTION}] section of Key=value lines; # and ; start a "
        "comment. A later assignment wins; an empty one (Key=) sets the option back to its "
        "built-in default; a repeatable option (UpdateVeto=) adds up. Options given on the "
        "command line win over every file, a repeatable one replaces what the files say. A bad "
        "value, an unknown key or a line that is no assignment stops luod at start with the "
        "file and the line (exit status 2).",
        ".PP",
        "The keys and the options they stand for:",
    ]
    for key, action in config.keys(parser).items():
        metavar = action.metavar if isinstance(action.metavar, str) else None
        if action.nargs == 0:
            value = "yes|no"
        elif action.choices:
            value = "|".join(map(str, action.choices))
        else:
            value = metavar or action.dest.upper()
        flag = action.option_strings[-1].replace("-", "\\-")
        lines += [".TP", f"\\fB{key}=\\fR{_roff(value)}", f"\\fB{flag}\\fR"]
    lines += [
        ".PP",
        "For example, /etc/luod/luod.conf.d/50-limits.conf:",
        ".PP",
        ".nf",
        ".RS",
        f"[{config.SECTION}]",
        "Grace=30min",
        "MaxFilesPerUser=8192",
        "UpdateVeto=vmm",
        ".RE",
        ".fi",
    ]
    return "\n".join(lines)


def luod_page() -> str:
    parser = daemon.build_parser()
    page = _page(parser, 8, "keep file descriptors alive across a kexec")
    page.add_section("configuration", ">", _config_section(parser))
    page.add_section(
        "varlink interfaces",
        ">",
        "luod serves io.luod.Custody (hand fds over, take them back) and io.luod.Manager "
        "(status, the preflight check, reclaim, the update barrier, loading the next kernel) "
        "on /run/luod/io.luod, registered in /run/varlink/registry/. "
        "luod.varlink(7) has both interfaces; varlinkctl introspect /run/luod/io.luod prints "
        "them from the running daemon.",
    )
    page.add_section(
        "files",
        ">",
        "\n".join(
            [
                ".TP",
                "/run/luod/io.luod",
                "the varlink socket (luod.socket)",
                ".TP",
                "/etc/luod/luod.conf, /etc/luod/luod.conf.d/*.conf",
                "the administrator's configuration",
                ".TP",
                "/usr/lib/luod/luod.conf, /usr/lib/luod/luod.conf.d/*.conf",
                "the package's defaults",
                ".TP",
                "/dev/liveupdate",
                "the kernel's Live Update Orchestrator",
            ]
        ),
    )
    page.add_section(
        "see also",
        ">",
        "luoctl(1), luod.varlink(7), systemd.exec(5), varlinkctl(1), systemd-analyze(1)",
    )
    return str(page)


def luoctl_page() -> str:
    parser = luoctl_parser()
    page = _page(parser, 1, "drive and inspect luod")
    page.add_section("see also", ">", "luod(8), luod.varlink(7)")
    return str(page)


def varlink_page() -> str:
    lines = [
        f'.TH LUOD.VARLINK "7" "{_date()}" "{PROJECT} {luod.__version__}" "luod"',
        ".SH NAME",
        "luod.varlink \\- the varlink interfaces of luod",
        ".SH DESCRIPTION",
        "luod(8) serves the interfaces below on /run/luod/io.luod. Their text is what the daemon "
        "itself serves (varlinkctl introspect /run/luod/io.luod INTERFACE).",
    ]
    for name, idl in interface_descriptions().items():
        lines += [f".SH {name.upper()}", ".nf", _roff(idl.rstrip("\n")), ".fi"]
    lines += [".SH SEE ALSO", "luod(8), luoctl(1), varlinkctl(1)", ""]
    return "\n".join(lines)


def completion(shell: str) -> str:
    text: str = shtab.complete(luoctl_parser(), shell=shell)
    return text


def vendor_config() -> str:
    """/usr/lib/luod/luod.conf: every key, commented out, at its default."""
    parser = daemon.build_parser()
    lines = [
        "# luod's settings and their built-in defaults: every key commented out.",
        "# This file is the package's and is replaced on upgrades: put changes into",
        f"# {config.DIRS[0]}/{config.NAME}.d/*.conf (or a {config.DIRS[0]}/{config.NAME} of your own,",
        "# which hides this one). Command-line options win. See luod(8).",
        "",
        f"[{config.SECTION}]",
    ]
    for key, action in config.keys(parser).items():
        default = action.default
        if isinstance(default, float):
            shown = f"{default:g}"
        elif isinstance(default, str | int) and not isinstance(default, bool):
            shown = str(default)
        else:
            shown = ""
        lines.append(f"#{key}={shown}")
    return "\n".join(lines) + "\n"


def render() -> dict[str, str]:
    """Relative path → content."""
    return {
        "man/luod.8": luod_page(),
        "man/luoctl.1": luoctl_page(),
        "man/luod.varlink.7": varlink_page(),
        "completion/luoctl": completion("bash"),
        "completion/_luoctl": completion("zsh"),
        "luod.conf": vendor_config(),
    }


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "build/docs")
    for rel, text in render().items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)


if __name__ == "__main__":
    main()
