# shellcheck shell=bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# The guest side of bench/systemd.py: two stages, one real kexec.
#   stage 1  the same N memfds into luod (PreserveFds batches) and into a
#            service's own fd store (sd_notify FDSTORE=1), in one transient
#            service that has an fd store; that session is discarded again
#            (it must not weigh on the reclaim measured in stage 2). Then two
#            services of one program (benchsvc.py) each hand a 4 KiB memfd
#            away: luod-bench-store.service into its own fd store
#            (FileDescriptorStorePreserve=yes), luod-bench-luod.service into
#            luod; both enabled (multi-user.target); `luoctl kexec`.
#   stage 2  both were started at boot; each noted CLOCK_BOOTTIME when it had
#            its fd back (with --handback a third one, whose ExecStartPre=
#            `luoctl handback` puts luod's copy into its fd store). Then: the units' timestamps (luod-reclaim.service,
#            luod.service, sysinit.target), GetInfo round trips against luod
#            and systemd-creds (varlinkping.py), and luod's start to READY
#            against `python3 -c "import asyncio"` (startup.py).
# shellcheck source=testsupport/systemd/guest/lib.sh
. "$LUOD_TEST_GUEST/lib.sh"

# On the root disk, not in /results: the units start before results.mount
# would be ordered for them, and a 9p read would cost the two differently.
BENCH_LIB=/usr/local/lib/luod-bench
BENCH_RUN=/run/luod-bench
# store luod, or store luod handback (bench/systemd.py --handback).
read -r -a MODES <"$G/bench-modes" 2>/dev/null || MODES=(store luod)
TS=ExecMainStartTimestampMonotonic,ExecMainExitTimestampMonotonic,ActiveEnterTimestampMonotonic,InactiveExitTimestampMonotonic,ActiveState,Result,ExecMainStatus,NRestarts,NFileDescriptorStore

# write_unit MODE DESCRIPTION [UNIT-LINES] [SERVICE-LINES]: the bench unit
# of benchsvc.py MODE in /etc/systemd/system (on disk: the next boot has it).
write_unit() {
	cat >"/etc/systemd/system/luod-bench-$1.service" <<-EOF
		# Written by bench/systemd-stage.sh (bench/systemd.py), test VMs only.
		[Unit]
		Description=luod bench: $2
		$3

		[Service]
		Type=oneshot
		RemainAfterExit=yes
		$4
		ExecStart=/usr/bin/python3 $BENCH_LIB/benchsvc.py $1 --out $BENCH_RUN

		[Install]
		WantedBy=multi-user.target
	EOF
}

install_units() {
	mkdir -p "$BENCH_LIB" &&
		cp "$G/benchsvc.py" "$BENCH_LIB/benchsvc.py" &&
		write_unit store "a memfd in the service's own fd store (systemd alone)" "" \
			"NotifyAccess=main
FileDescriptorStoreMax=4
FileDescriptorStorePreserve=yes" &&
		write_unit luod "a memfd held by luod (RetrieveFd)" \
			"Wants=luod-reclaim.service
After=luod-reclaim.service" "" &&
		write_unit handback "a memfd held by luod (luoctl handback into the fd store)" \
			"Wants=luod-reclaim.service
After=luod-reclaim.service" \
			"NotifyAccess=all
FileDescriptorStoreMax=4
ExecStartPre=/usr/bin/luoctl handback bench-handback --optional" &&
		systemctl daemon-reload
}

if [[ $STAGE == 1 ]]; then
	count=$(cat "$G/bench-count" 2>/dev/null || echo 1000)
	step luod-up luoctl --json status
	step compare systemd-run --wait --pipe --quiet --unit=luod-bench-fdstore \
		-p Type=oneshot -p NotifyAccess=main -p "FileDescriptorStoreMax=$((count + 64))" \
		python3 "$G/bulk.py" compare --count "$count" --info "$OUT/bench.json"
	step discard-compare luoctl discard bench
	step install install_units
	for mode in "${MODES[@]}"; do
		step "start-$mode" systemctl start "luod-bench-$mode.service"
		step "json-$mode" cat "$BENCH_RUN/$mode.json"
		step "enable-$mode" systemctl enable "luod-bench-$mode.service"
	done
	step fdstore systemd-analyze fdstore luod-bench-store.service
	step list luoctl --json list
	step journal-luod journalctl -b --no-pager -o short-monotonic -u luod.service
	# shellcheck disable=SC2119 # no extra luoctl kexec arguments
	stage_kexec
	exit 1
fi

# Stage 2, after the kexec. First what the boot did, before anything here
# restarts luod.
for mode in "${MODES[@]}"; do
	step "show-luod-bench-$mode" systemctl show -p "$TS" "luod-bench-$mode.service"
done
for unit in luod-reclaim luod; do
	step "show-$unit" systemctl show -p "$TS" "$unit.service"
done
step show-sysinit systemctl show -p ActiveEnterTimestampMonotonic sysinit.target
step show-multi-user systemctl show -p ActiveEnterTimestampMonotonic multi-user.target
step show-manager systemctl show -p KernelTimestampMonotonic,UserspaceTimestampMonotonic,FinishTimestampMonotonic
step reclaim-execstart systemctl show -p ExecStart luod-reclaim.service
step reclaim-order systemctl show -p Before,After luod-reclaim.service
# When each unit sysinit.target waits for was up: without the reclaim unit,
# sysinit.target would have been reached when the last of the others was.
# shellcheck disable=SC2046 # one word per unit
step sysinit-deps systemctl show -p Id,ActiveEnterTimestampMonotonic \
	$(systemctl show -p After --value sysinit.target)
step critical-chain systemd-analyze critical-chain --no-pager sysinit.target
for mode in "${MODES[@]}"; do
	step "json-$mode" cat "$BENCH_RUN/$mode.json"
done
step fdstore systemd-analyze fdstore luod-bench-store.service
step list luoctl --json list

# Goal 7: systemd-creds.socket (Accept=yes) is in sockets.target of the sid
# root; start it should a later image leave it out.
creds=/run/systemd/io.systemd.Credentials
[[ -S $creds ]] || systemctl start systemd-creds.socket
step varlink python3 "$G/varlinkping.py" --info "$OUT/varlink.json" \
	"luod=$SOCK" "sd-varlink=$creds"

# Goal 2, last: it restarts luod.
step startup python3 "$G/startup.py" --info "$OUT/startup.json"
step journal-luod journalctl -b --no-pager -o short-monotonic \
	-u luod.service -u luod-reclaim.service -u 'luod-bench-*'
finish
