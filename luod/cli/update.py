"""luoctl's update commands: the next kernel (load, unload), the live update
(update, kexec = load + update) and following one (subscribe)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from luod.cli.common import CliError, connect
from luod.client import Client


def _load(c: Client, args: argparse.Namespace) -> None:
    loaded = c.load_kernel(
        os.path.abspath(args.kernel),
        os.path.abspath(args.initrd) if args.initrd else None,
        args.append,
        args.reuse_cmdline,
        args.force,
    )
    print(
        f"loaded {loaded['kernel']}{' (UKI)' if loaded.get('uki') else ''} with kexec_file_load, "
        f"command line: {loaded['commandLine']!r}"
    )
    for p in loaded.get("problems") or []:
        print(f"warning: it cannot take the handover: {p}", file=sys.stderr)


def cmd_load(args: argparse.Namespace) -> int:
    with connect(args) as c:
        _load(c, args)
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    with connect(args) as c:
        c.unload_kernel()
    print("unloaded")
    return 0


def _update(c: Client, force: bool) -> int:
    res = c.check()
    if not res["ready"] and not force:
        for p in res["problems"]:
            print(f"{p['session'] or 'luod'}: {p['reason']}", file=sys.stderr)
        raise CliError(
            1, "preflight check failed; nothing was started (use --force to go ahead anyway)"
        )
    try:
        out = c.update(force=force)
    except ConnectionError:
        # PID 1 stopped luod on its way into the kexec before luod replied.
        print("the live update is under way")
        return 0
    print(
        f"update {out['update']}: subscribers ready "
        f"(prepare {out['prepareUSec'] / 1000:.1f} ms, freeze {out['freezeUSec'] / 1000:.1f} ms); "
        "jumping into the next kernel"
    )
    for said in out.get("overridden") or []:
        print(f"went on past {said}", file=sys.stderr)
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    with connect(args) as c:
        return _update(c, args.force)


def cmd_kexec(args: argparse.Namespace) -> int:
    with connect(args) as c:
        if args.kernel:
            _load(c, args)
        return _update(c, args.force)


def cmd_subscribe(args: argparse.Namespace) -> int:
    """Follow updates; with --ack answer prepare and freeze (tests, demos, scripts)."""
    with connect(args) as c:
        acks: Client | None = connect(args) if args.ack or args.refuse else None
        try:
            for ev in c.subscribe(args.name, args.deadline):
                if args.json:
                    print(json.dumps(ev, sort_keys=True), flush=True)
                else:
                    extra = ", ".join(
                        f"{k}={v}"
                        for k, v in ev.items()
                        if k not in ("phase", "subscription") and v is not None
                    )
                    print(f"{ev['phase']}" + (f" ({extra})" if extra else ""), flush=True)
                if acks is not None and ev["phase"] in ("prepare", "freeze"):
                    refuse = ev["phase"] == args.refuse
                    acks.acknowledge(
                        ev["subscription"],
                        ev["update"],
                        ev["phase"],
                        refuse,
                        args.reason if refuse else None,
                    )
        finally:
            if acks is not None:
                acks.close()
    return 0
