# shellcheck shell=bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Sourced by the stage programs of tests/systemd and bench/systemd.py (bash,
# run by /usr/lib/luod-test/test-stage in the guest; see
# testsupport/systemd/harness.py).
#
#   step NAME CMD...      run CMD; keep stdout, stderr and the exit status in
#                         $LUOD_TEST_OUT/NAME.{out,err,rc}; never fails itself
#   step_sh NAME SCRIPT   the same for a bash snippet
#   finish                write $LUOD_TEST_OUT/stage.json (all steps)
#   stage_kexec [ARGS]    save logs, then `luoctl kexec /boot/vmlinuz --append
#                         "<this cmdline, luod.test_stage=N+1>" ARGS`; returns
#                         only if that failed (the unit is stopped otherwise)
#   stage_jump CMD...     the same with CMD instead of luoctl kexec (e.g.
#                         `luoctl update` after `luoctl load ... --append
#                         "$(next_cmdline)"`)
#   wait_until SECONDS CMD...  until CMD succeeds (polled every 0.05 s);
#                         fails after SECONDS
#   wait_started UNIT...  wait until no UNIT is activating (120 s at most)
#   analyze_boot          true when the host asked for systemd-analyze
#                         blame and critical-chain (LUOD_SYSTEMD_ANALYZE=1)

set -u
: "${LUOD_TEST_STAGE:?} ${LUOD_TEST_OUT:?} ${LUOD_TEST_GUEST:?}"
# shellcheck disable=SC2034 # used by the stage programs
SOCK=/run/luod/io.luod
OUT=$LUOD_TEST_OUT
G=$LUOD_TEST_GUEST
STAGE=$LUOD_TEST_STAGE
export SYSTEMD_PAGER='' SYSTEMD_COLORS=0

uptime_s() {
	local up _
	read -r up _ </proc/uptime
	echo "$up"
}

step() {
	local name=$1 rc
	shift
	"$@" >"$OUT/$name.out" 2>"$OUT/$name.err" </dev/null
	rc=$?
	echo "$rc" >"$OUT/$name.rc"
	echo "$name" >>"$OUT/steps.txt"
	echo "[$(uptime_s)] step $name: rc=$rc: $*"
	return 0
}

step_sh() {
	step "$1" bash -c "$2"
}

finish() {
	python3 - "$OUT" <<-'PY'
		import json, pathlib, sys
		out = pathlib.Path(sys.argv[1])
		names = (out / "steps.txt").read_text().split() if (out / "steps.txt").exists() else []
		def read(n, s):
		    p = out / f"{n}.{s}"
		    return p.read_text(errors="replace") if p.exists() else ""
		steps = {n: {"rc": int(read(n, "rc") or -1), "out": read(n, "out")[-20000:],
		             "err": read(n, "err")[-20000:]} for n in names}
		(out / "stage.json").write_text(json.dumps({"steps": steps}, indent=1) + "\n")
	PY
}

# wait_until SECONDS CMD...: until CMD succeeds, polled every 0.05 s; fails
# after SECONDS.
wait_until() {
	local rounds=$(($1 * 20)) _
	shift
	for _ in $(seq "$rounds"); do
		"$@" && return 0
		sleep 0.05
	done
	return 1
}

# none_activating UNIT...: no UNIT is starting.
none_activating() {
	local unit
	for unit in "$@"; do
		[[ $(systemctl show -P ActiveState "$unit") == activating ]] && return 1
	done
	return 0
}

# wait_started UNIT...: until no UNIT is starting any more (120 s at most).
# luod-reclaim.service is ordered before nothing (units/luod-reclaim.service):
# the boot, and a stage after multi-user.target, may come before it is done.
wait_started() {
	wait_until 120 none_activating "$@"
}

# Whether the host asked for systemd-analyze blame and critical-chain
# (LUOD_SYSTEMD_ANALYZE=1: luod.test_analyze=1 on the command line).
analyze_boot() {
	local words w
	read -r -a words </proc/cmdline
	for w in "${words[@]}"; do
		[[ $w == luod.test_analyze=1 ]] && return 0
	done
	return 1
}

# This boot's command line with luod.test_stage=N+1.
next_cmdline() {
	local words w out=()
	read -r -a words </proc/cmdline
	for w in "${words[@]}"; do
		case $w in
		luod.test_stage=*) ;;
		*) out+=("$w") ;;
		esac
	done
	out+=("luod.test_stage=$((STAGE + 1))")
	echo "${out[*]}"
}

collect_logs() {
	journalctl -b --no-pager -o short-monotonic >"$OUT/journal.txt" 2>&1
	journalctl -b --no-pager -o short-monotonic -u luod.service -u luod.socket \
		-u luod-reclaim.service >"$OUT/journal-luod.txt" 2>&1
}

stage_kexec() {
	stage_jump luoctl kexec /boot/vmlinuz --append "$(next_cmdline)" "$@"
}

# stage_jump CMD...: stage_kexec with another command that ends in the kexec
# (e.g. `luoctl update` after a `luoctl load` of /boot/vmlinuz with
# next_cmdline); returns only if it failed.
stage_jump() {
	local rc
	finish
	collect_logs
	uptime_s >"$G/stage-$STAGE.kexec"
	sync
	echo "[$(uptime_s)] $*"
	"$@" >"$OUT/kexec.out" 2>&1
	rc=$?
	echo "$rc" >"$OUT/kexec.rc"
	cat "$OUT/kexec.out"
	if [[ $rc != 0 ]]; then
		rm -f "$G/stage-$STAGE.kexec"
		echo "$1 failed with $rc"
		return "$rc"
	fi
	# systemctl kexec has queued kexec.target: wait to be stopped with the rest.
	sleep 300
	echo "still running 300 s after systemctl kexec"
	rm -f "$G/stage-$STAGE.kexec"
	return 1
}
