# shellcheck shell=bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Issue 11 under systemd 262, three stages: luod killed with SIGKILL inside
# the re-preserve after `systemctl kexec` and inside a hand-off, started
# again each time by systemd (Restart=on-failure) from its fd store.
#
# The kills: a drop-in of luod.service (written in stage 1, read from the
# next boot on) runs luod as the test entry point (/usr/lib/luod-test/
# luod-crash-once -> python3 -m testsupport.luod_crashable), armed at its
# first start in a boot with again.finished:2 and at its second with
# handoff.preserved (LUOD_TEST_CRASHES); the third runs unarmed.
#
# 1. files handed to luod; the drop-in; kexec.
# 2. luod died at boot inside the re-preserve (its second incoming session
#    finished, not preserved again) and came back: every file retrieved
#    right away, the reclaim report (GetStatus). Then a hand-off during
#    which luod dies (the kernel holds the file, luod's reference is not
#    kept, no reply sent); luod back again: every file retrieved right
#    after READY; later hand-offs into the same session. Then luod killed
#    while the reply of a take waits for a client that reads nothing; luod
#    back: the file is held again; kexec.
# 3. no kill: every file retrieved again, the reclaim report.
# shellcheck source=testsupport/systemd/guest/lib.sh
. "$LUOD_TEST_GUEST/lib.sh"

svc=ActiveState,SubState,Result,MainPID,NRestarts,ExecMainCode,ExecMainStatus,ExecStart,Environment,NFileDescriptorStore
FILES=/usr/lib/luod-test/luod_test_files.py
DROPIN=/etc/systemd/system/luod.service.d/50-crash.conf
S1=$LUOD_TEST_RESULTS/stage-1
S2=$LUOD_TEST_RESULTS/stage-2

# restarted N: luod.service active again after N restarts (READY=1 of the
# new luod: Type=notify).
restarted() {
	[[ $(systemctl show -P NRestarts luod.service) -ge $1 &&
		$(systemctl is-active luod.service) == active ]]
}

# back: luod.service and luod-reclaim.service both active. After luod was
# killed at boot both are restarted, and the boot (multi-user.target, then
# this stage) does not wait for that.
back() {
	# (is-active of two units is true when either is)
	systemctl is-active --quiet luod.service &&
		systemctl is-active --quiet luod-reclaim.service
}

journal_luod() {
	journalctl -b --no-pager -o short-monotonic -u luod.service -u luod.socket \
		-u luod-reclaim.service
}

if [[ $STAGE == 1 ]]; then
	step put python3 "$FILES" put "$OUT/files.json" \
		cs0/a:4096:100 cs0/b:262144:0 cs0/c:1048576:4096 \
		cs1/a:65536:7 cs1/b:524288:0 cs2/a:131072:0
	# For the next boot (no daemon-reload: luod here stays as it is).
	mkdir -p "$(dirname "$DROPIN")"
	cat >"$DROPIN" <<-EOF
		[Service]
		ExecStart=
		ExecStart=/usr/lib/luod-test/luod-crash-once
		Environment="LUOD_TEST_CRASHES=again.finished:2 handoff.preserved"
		# Killed at a step, not for being slow: under TCG on a loaded host
		# the armed luod's start at boot once took longer than systemd's
		# default 90 s (32 s of CPU in 91 s), and was stopped before it.
		TimeoutStartSec=10min
	EOF
	# shellcheck disable=SC2119 # no extra luoctl kexec arguments
	stage_kexec
	exit 1
fi

if [[ $STAGE == 2 ]]; then
	step back wait_until 60 back
	step luod systemctl show -p "$svc" luod.service
	step reclaim systemctl show -p ActiveState,SubState,Result,ExecMainStatus luod-reclaim.service
	step get python3 "$FILES" get "$OUT/get.json" "$S1/files.json"
	# luod's second start in this boot is armed at handoff.preserved.
	step inflight python3 "$FILES" put "$OUT/inflight.json" cs0/d:65536:0
	step wait-restarted wait_until 60 restarted 2
	# Right after READY: no NotReady, nothing missing.
	step get-after-crash python3 "$FILES" get "$OUT/after-crash.json" "$S1/files.json" "$OUT/inflight.json"
	step luod-after-crash systemctl show -p "$svc" luod.service
	# The session goes on: no token left blocking, no session out of step.
	step later python3 "$FILES" put "$OUT/later.json" cs0/e:32768:0 cs1/c:8192:0
	step get-all python3 "$FILES" get "$OUT/get-all.json" "$S1/files.json" "$OUT/inflight.json" "$OUT/later.json"
	# A take whose reply waits for a client that reads nothing, and luod
	# killed (systemctl kill) meanwhile: the luod started again holds the
	# file again.
	step take-unread python3 "$FILES" take-unread "$OUT/take-unread.json" cs1/a
	step wait-restarted-again wait_until 60 restarted 3
	step get-after-take python3 "$FILES" get "$OUT/after-take.json" "$S1/files.json" "$OUT/inflight.json" "$OUT/later.json"
	step journal-luod journal_luod
	# Gone from the next boot on (no daemon-reload needed for that).
	rm -f "$DROPIN"
	# shellcheck disable=SC2119
	stage_kexec
	exit 1
fi

step luod systemctl show -p "$svc" luod.service
step get python3 "$FILES" get "$OUT/get.json" "$S1/files.json" "$S2/inflight.json" "$S2/later.json"
step journal-luod journal_luod
finish
