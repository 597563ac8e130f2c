# shellcheck shell=bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# A QEMU VM through the host's live update, two stages (test_qemu_cpr.py,
# `make demo-vm`; checks in testsupport/systemd/vmpause.py). The VM is
# examples/qemu-cpr/ installed as README's "A VM through a live update"
# says (its files are in $G): luod-vmm@demo.service runs QEMU 11 (TCG) with
# 4 MiB of guest RAM in a memfd luod holds, the guest a 512-byte boot sector
# that counts timer ticks.
# Stage 1: the VM runs; an update during which its QEMU hangs (so the save
# cannot finish) is aborted and the guest runs on; then `luoctl update`.
# Stage 2: luod-vmm@demo.service, started again, has resumed the guest.
# Few Python starts: under TCG each costs seconds (qemucpr.py peek does
# several things in one).
# shellcheck source=testsupport/systemd/guest/lib.sh
. "$LUOD_TEST_GUEST/lib.sh"

H=$G/qemucpr.py

if [[ $STAGE == 1 ]]; then
	# README, "A VM through a live update": install, configure, start.
	step_sh install "cd '$G' && "'
		install -m 755 luod-vmm.py /usr/local/bin/luod-vmm &&
		install -D -m 644 tinyguest.py /usr/local/lib/luod-vmm/tinyguest.py &&
		install -m 644 luod-vmm@.service /etc/systemd/system/ &&
		mkdir -p /etc/luod-vmm /var/lib/luod-vmm/demo &&
		python3 /usr/local/lib/luod-vmm/tinyguest.py image /var/lib/luod-vmm/demo/counter.img &&
		cat >/etc/luod-vmm/demo.conf <<-EOF
			LUOD_VMM_OPTIONS=--memory 4M --deadline 6 --timeline /var/lib/luod-vmm/demo/timeline.jsonl --hash-ram --peek 0x9000
			QEMU_ARGS=-machine pc -accel tcg,tb-size=32 -smp 1 -drive file=/var/lib/luod-vmm/demo/counter.img,format=raw,if=ide
		EOF
	'
	step start systemctl enable --now luod-vmm@demo.service
	step peek-before python3 "$H" peek demo --out "$OUT/peek-before.json"
	step load luoctl load /boot/vmlinuz --append "$(next_cmdline)"

	# The VMM cannot save: its QEMU hangs after prepare. luod aborts the
	# update, the guest runs on.
	python3 "$H" hang-qemu demo --out "$OUT/hang.json" >"$OUT/hang.log" 2>&1 &
	hang=$!
	for _ in $(seq 600); do
		[[ -e $OUT/hang.json.ready ]] && break
		sleep 0.1
	done
	step update-hung luoctl update
	wait "$hang"
	echo "$?" >"$OUT/hang.rc"
	step peek-after-abort python3 "$H" peek demo --anchor "$OUT/anchor-update.json" \
		--out "$OUT/peek-after-abort.json"

	# The live update itself.
	stage_jump luoctl update
	exit 1
fi

step peek-after python3 "$H" peek demo --anchor "$OUT/anchor-boot.json" --samples 3 \
	--out "$OUT/peek-after.json"
step units systemctl show -p Id,MainPID,ActiveState,Result,ExecMainStartTimestampMonotonic,ActiveEnterTimestampMonotonic \
	luod-vmm@demo.service luod.service luod-reclaim.service
step timeline cat /var/lib/luod-vmm/demo/timeline.jsonl
step journal-vmm journalctl -b --no-pager -o short-monotonic -u luod-vmm@demo.service
step journal-prev-vmm journalctl -b -1 --no-pager -o short-monotonic -u luod-vmm@demo.service
step journal-prev-luod-json journalctl -b -1 --no-pager -o json -u luod.service
step journal-luod journalctl -b --no-pager -o short-monotonic -u luod.service -u luod.socket -u luod-reclaim.service
finish
