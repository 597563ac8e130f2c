"""luod's start from two (or more) source trees, interleaved in one boot.

A change to luod's start moves goal 2 by a few percent, and one luod start
in this TCG guest moves by up to 30 % from the next: two runs of
`bench.run` (one per tree, minutes apart) cannot tell such a change from
the host's load. This boots the project's LUO kernel once and starts luod
from each tree in turn, round after round, with one run of
`python -c "import asyncio"` in each round, each in a rotating position;
each luod is stopped as soon as it is READY. It prints each tree's median
start, its ratio to the baseline's median, and, per round, each tree's
start over the first tree's.

    .venv/bin/python -m bench.starts [--rounds N] TREE [TREE ...]

A TREE is a checkout of luod (its `luod/` is imported from there, with
this checkout's venv and interpreter); `git worktree add ../luod-old REV`
makes one. The guest sees the host's files, but not under /tmp and /run,
which are its own: such a tree is refused. Each luod is started in its
tree (testsupport.luodproc's `repo`, which tests/test_luodproc.py holds to
importing that tree's luod). Each tree's byte-code is compiled before the
boot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.guest import new_luod, python_baseline, start, stop

BASELINE = "asyncio"
# What the guest mounts its own file systems on (vm/guest-init.sh).
GUEST_OWN = ("/tmp", "/run", "/proc", "/sys", "/dev")


def guest(trees: list[str], rounds: int) -> dict[str, list[float]]:
    """In the guest: a start of each tree's luod and one baseline run per
    round, the order rotated every round; one unmeasured round first (the
    page cache)."""
    names = [*trees, BASELINE]
    runs: dict[str, list[float]] = {name: [] for name in names}
    luods = {
        tree: new_luod(repo=tree, work=Path(tempfile.mkdtemp(prefix="luod-starts-")))
        for tree in trees
    }

    def run(name: str) -> float:
        if name == BASELINE:
            return python_baseline(1)[0]
        took = start(luods[name])
        stop(luods[name])
        return took

    for name in names:
        run(name)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            runs[name].append(run(name))
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.2f} s" for n, v in runs.items()))
    return runs


def report(trees: list[str], runs: dict[str, list[float]]) -> list[str]:
    base = statistics.median(runs[BASELINE])
    lines = [f"python -c 'import asyncio': median {base:.2f} s of {len(runs[BASELINE])}"]
    for tree in trees:
        mine = statistics.median(runs[tree])
        per_round = statistics.median(
            x / y for x, y in zip(runs[tree], runs[BASELINE], strict=True)
        )
        lines.append(
            f"{tree}: luod start -> READY median {mine:.2f} s, {mine / base:.2f}x the baseline's "
            f"median (per round: median {per_round:.2f}x)"
        )
    first = trees[0]
    for tree in trees[1:]:
        rel = [x / y for x, y in zip(runs[tree], runs[first], strict=True)]
        lines.append(
            f"{tree} / {first}, per round: median {statistics.median(rel):.3f} "
            f"({' '.join(f'{x:.2f}' for x in rel)})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    config = os.environ.get("LUOD_STARTS_CONFIG")
    if config is not None:  # the guest's side
        from testsupport.vm import guestlib

        cfg = json.loads(config)
        guestlib.write_json("starts.json", guest(cfg["trees"], cfg["rounds"]))
        return 0

    from bench.run import compile_bytecode
    from testsupport.vm import qemu
    from testsupport.vm.timeline import Timeline

    p = argparse.ArgumentParser(prog="python -m bench.starts", description=__doc__.split("\n")[0])
    p.add_argument("trees", nargs="+", type=Path, metavar="TREE", help="checkouts of luod")
    p.add_argument("--rounds", type=int, default=16, help="rounds (default 16)")
    p.add_argument("--results", type=Path, help="results folder (default: a new one in /tmp)")
    args = p.parse_args(argv)
    trees = [str(t.resolve()) for t in args.trees]
    for tree in trees:
        if not os.path.isfile(os.path.join(tree, "luod", "daemon.py")):
            p.error(f"{tree}: no luod/daemon.py there: not a checkout of luod")
        if any(tree == d or tree.startswith(d + "/") for d in GUEST_OWN):
            p.error(f"{tree}: the guest does not see it ({', '.join(GUEST_OWN)} are its own)")
    reason = qemu.qemu_unavailable_reason()
    if reason is not None:
        print(f"bench.starts: cannot run: {reason}", file=sys.stderr)
        return 2
    for line in compile_bytecode():
        print(f"bench.starts: {line}", flush=True)
    for tree in trees:
        subprocess.run([sys.executable, "-m", "compileall", "-q", f"{tree}/luod"], check=True)
    results: Path = args.results or Path(tempfile.mkdtemp(prefix="luod-starts-"))
    cfg = {"trees": trees, "rounds": args.rounds}
    result = Timeline(results).run_guest(
        qemu.build_kernel("stock"),
        Path(__file__),
        3600.0,
        guest_env={"LUOD_STARTS_CONFIG": json.dumps(cfg)},
        memory="2G",
        one_thread=False,
    )
    result.check(final_stage=1)
    runs = json.loads((results / "starts.json").read_text())
    print("\n".join(report(trees, runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
