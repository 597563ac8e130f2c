"""luod, the daemon: its command line, and the wiring of its parts.

This module parses luod's options and puts the parts together — the kernel
backend, the carrier (luod.carriers), the custodian (luod.custody), the
update barrier (luod.orchestrator), the next kernel (luod.nextkernel), the
varlink interfaces — and hands them to the run loop of luod.service. It
decides nothing itself. Tests run it on their fake kernel through an
entry point of their own, which passes `main` a backend.
"""

from __future__ import annotations

import argparse
import asyncio
import pwd
import re
import resource
import sys
from collections.abc import Sequence

import luod
from luod import carriers, config, notify, quotas, service, servicemanager
from luod import log as logsetup
from luod.custody import Custodian
from luod.interfaces import DEFAULT_SOCKET
from luod.kernel.backend import BOOT_ID_PATH, Backend, KernelBackend
from luod.log import get_logger
from luod.nextkernel import NextKernel
from luod.notify import ListenFd
from luod.orchestrator import MAX_SUBSCRIPTIONS, MAX_SUBSCRIPTIONS_ROOT, Orchestrator, Policy
from luod.varlink import limits
from luod.varlink.registry import make_registry

log = get_logger()

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|sec|m|min|h)?\s*$")
_UNIT = {
    None: 1.0,
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "sec": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> float:
    """'600', '10min', '1.5s', '2h' → seconds."""
    m = _DURATION.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration (try 600, 10min, 30s, 1h)")
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse_users(text: str) -> frozenset[int]:
    """'vmm,1001' → uids; names through the user database, now."""
    uids: set[int] = set()
    for item in filter(None, (i.strip() for i in text.split(","))):
        if item.isdigit():
            uids.add(int(item))
            continue
        try:
            uids.add(pwd.getpwnam(item).pw_uid)
        except KeyError:
            raise argparse.ArgumentTypeError(
                f"no user named '{item}' (give a name or a uid)"
            ) from None
    return frozenset(uids)


def parse_count(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of 0 or more")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="luod",
        description=(
            "Keep file descriptors alive across a kexec with Linux's Live Update "
            "Orchestrator (/dev/liveupdate). Services hand fds to luod over varlink; "
            "after the kexec luod gives them back. Usually started by luod.socket."
        ),
    )
    p.add_argument("--version", action="version", version=f"luod {luod.__version__}")
    p.add_argument(
        "--socket",
        default=DEFAULT_SOCKET,
        help=f"varlink socket to listen on when not socket-activated (default: {DEFAULT_SOCKET})",
    )
    p.add_argument(
        "--grace",
        type=parse_duration,
        default=600.0,
        help="after a kexec, release what no owner claimed within this time (default: 10min)",
    )
    p.add_argument(
        "--carrier",
        choices=("auto", *carriers.CARRIERS),
        default="auto",
        help=(
            "how sessions and the manifest get across the kexec. fdstore: in luod's fd store, "
            "carried by PID 1 (systemd >= 261, FileDescriptorStorePreserve=yes). state-session: "
            "the manifest in a LUO session of luod's own, luod holds every session until the "
            "reboot syscall. auto (default): fdstore when $FDSTORE and $NOTIFY_SOCKET are set"
        ),
    )
    p.add_argument(
        "--service-manager",
        metavar="PATH",
        default=servicemanager.MANAGER_SOCKET,
        help=(
            "with the fdstore carrier: the service manager's varlink socket, asked for its "
            "version at start; unless it is systemd >= "
            f"{servicemanager.CARRIES_FDSTORE_OVER_KEXEC}, which carries the fd store over a "
            "kexec, the preflight check (luoctl check) fails (default: %(default)s)"
        ),
    )
    p.add_argument(
        "--update-veto",
        metavar="USER[,USER...]",
        type=parse_users,
        action="append",
        default=[],
        help=(
            "users (names or uids; repeatable) whose subscribers may stop a live update by "
            "refusing, missing their deadline or going away, as root's may. Anyone else's "
            "subscribers are told every phase, but their refusal is logged and the update goes "
            "on. A forced update (luoctl update --force) goes on past every refusal "
            "(default: root only)"
        ),
    )
    p.add_argument(
        "--max-subscriptions-per-user",
        metavar="N",
        type=parse_count,
        default=MAX_SUBSCRIPTIONS,
        help="update subscriptions each non-root uid may hold at once (default: %(default)s)",
    )
    p.add_argument(
        "--max-subscriptions-root",
        metavar="N",
        type=parse_count,
        default=MAX_SUBSCRIPTIONS_ROOT,
        help="update subscriptions root may hold at once (default: %(default)s)",
    )
    p.add_argument(
        "--max-connections",
        metavar="N",
        type=parse_count,
        default=None,
        help=(
            "varlink connections luod serves at once; more are closed at once. The rest of "
            "the open-file limit is for the files luod holds (default: a quarter of the "
            f"open-file limit, at most {limits.DEFAULT_MAX_CONNECTIONS})"
        ),
    )
    p.add_argument(
        "--connections-reserved-for-root",
        metavar="N",
        type=parse_count,
        default=None,
        help="of --max-connections, how many only root may use (default: an eighth)",
    )
    p.add_argument(
        "--max-connections-per-user",
        metavar="N",
        type=parse_count,
        default=limits.DEFAULT_MAX_CONNECTIONS_PER_USER,
        help="varlink connections each non-root uid may hold at once (default: %(default)s)",
    )
    p.add_argument(
        "--idle-timeout",
        metavar="DURATION",
        type=parse_duration,
        default=limits.DEFAULT_IDLE_TIMEOUT,
        help=(
            "close a connection that sent no message this long after connecting; 0: never "
            "(default: 30s)"
        ),
    )
    quotas.add_options(p)
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    p.add_argument("--log-format", choices=("logfmt", "json"), default="logfmt")
    # Last: the keys are every option above (luod.config).
    p.epilog = config.epilog(p)
    return p


def update_policy(args: argparse.Namespace) -> Policy:
    return Policy(
        veto_uids=frozenset().union(*args.update_veto),
        max_subscriptions=args.max_subscriptions_per_user,
        max_subscriptions_root=args.max_subscriptions_root,
    )


def connection_limits(args: argparse.Namespace) -> limits.Limits:
    """The caps of luod.varlink.limits; after raise_nofile_limit(), since the
    default caps are shares of the open-file limit."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    total = args.max_connections
    if total is None:
        total = limits.default_max_connections(nofile)
    if total < 1:
        raise SystemExit("luod: --max-connections=0 would serve no one; give it 1 or more")
    reserved = args.connections_reserved_for_root
    if reserved is None:
        reserved = total // 8
    if reserved >= total:
        raise SystemExit(
            f"luod: --connections-reserved-for-root={reserved} leaves no connection of "
            f"--max-connections={total} to anyone else; give it less"
        )
    transit = limits.default_max_transit_fds(nofile)
    return limits.Limits(
        max_connections=total,
        reserved_for_root=reserved,
        max_per_user=args.max_connections_per_user,
        idle_timeout=args.idle_timeout,
        max_transit_fds=transit,
        transit_fds_reserved_for_root=limits.default_transit_fds_reserved_for_root(transit),
    )


def boot_identity(backend: Backend) -> str:
    """What tells this boot from the one a manifest was written in."""
    try:
        return backend.boot_id()
    except OSError as e:
        log.warning("no-boot-id", path=BOOT_ID_PATH, reason=e.strerror)
        return ""  # never "the same boot": a restart is then taken for a kexec


def raise_nofile_limit() -> None:
    """Every held file is an fd; the default soft limit of 1024 is far too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(args: argparse.Namespace, custodian: Custodian, activated: ListenFd | None) -> int:
    """Wire the parts that live in the event loop, then run."""
    stopping = asyncio.Event()
    nextkernel = NextKernel(
        custodian.backend,
        # luod's state kept by the service manager's fd store is carried over
        # the kexec only by PID 1's own, orderly kexec.
        via_pid1=custodian.carrier.holds_after_exit,
        session_count=lambda: custodian.session_count,
        on_kexec=stopping.set,
    )
    orchestrator = Orchestrator(on_subscribe=custodian.note_subscriber, policy=update_policy(args))
    registry = make_registry(custodian, orchestrator, nextkernel)
    listener = service.listen_socket(activated, args.socket)
    return await service.Service(
        custodian, orchestrator, nextkernel, registry, listener, stopping, connection_limits(args)
    ).run()


def main(argv: Sequence[str] | None = None, backend: Backend | None = None) -> int:
    """luod. `backend`: the kernel to use instead of /dev/liveupdate (tests)."""
    args = config.parse_args(build_parser, argv)
    logsetup.setup(args.log_level, json=args.log_format == "json", cache=True)
    if backend is None:
        backend = KernelBackend()
    reason = backend.unavailable_reason()
    if reason is not None:
        log.error("no-liveupdate", reason=reason)
        notify.notify(f"STATUS={reason}\nERRNO=19")
        print(f"luod: {reason}", file=sys.stderr)
        return 1
    raise_nofile_limit()
    activated, rest = service.split_listen_fds(notify.listen_fds())
    if activated is not None:
        # Before anything is taken over: a refusal leaves the store as it is.
        service.check_varlink_socket(activated)
    carrier = carriers.make_carrier(
        args.carrier, backend, rest, service_manager=args.service_manager
    )
    custodian = Custodian(
        backend,
        carrier,
        grace=args.grace,
        boot_id=boot_identity(backend),
        quotas=quotas.from_options(args),
    )
    return asyncio.run(serve(args, custodian, activated))


if __name__ == "__main__":
    sys.exit(main())
