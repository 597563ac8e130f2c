# shellcheck shell=bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Scenario (b), two stages: a memfd handed to luod with nothing but
# `varlinkctl --push-fd=`, `luoctl kexec` (-> systemctl kexec), and after the
# boot luod-reclaim.service has run and `varlinkctl --exec` gives it back.
# shellcheck source=testsupport/systemd/guest/lib.sh
. "$LUOD_TEST_GUEST/lib.sh"

svc=ActiveState,SubState,Result,InvocationID,MainPID,NFileDescriptorStore,FileDescriptorStorePreserve

if [[ $STAGE == 1 ]]; then
	step boot-luod systemctl show -p "$svc" luod.service
	step preserve python3 "$G/memfd.py" create --size 1048576 --seed handoff --pos 4096 \
		--info "$OUT/memfd.json" -- \
		varlinkctl call --push-fd=3 "$SOCK" io.luod.Custody.PreserveFd \
		'{"session":"handoff","name":"blob","fileDescriptor":0,"createSession":true}'
	step list luoctl --json list
	step status luoctl --json status
	step check luoctl check
	step luod-before-kexec systemctl show -p "$svc" luod.service
	step fdstore-before-kexec systemd-analyze fdstore luod.service
	step manager varlinkctl call /run/systemd/io.systemd.Manager io.systemd.Manager.Describe '{}'
	# shellcheck disable=SC2119 # no extra luoctl kexec arguments
	stage_kexec
	exit 1
fi

step reclaim systemctl show -p ActiveState,SubState,Result,ExecMainStatus,ExecMainCode luod-reclaim.service
step luod systemctl show -p "$svc" luod.service
step fdstore systemd-analyze fdstore luod.service
step retrieve varlinkctl --exec call "$SOCK" io.luod.Custody.RetrieveFd \
	'{"session":"handoff","name":"blob"}' -- \
	python3 "$G/memfd.py" describe --fd 3 --info "$OUT/retrieved.json"
step status luoctl --json status
step list luoctl --json list
step manager varlinkctl call /run/systemd/io.systemd.Manager io.systemd.Manager.Describe '{}'
step journal-luod journalctl -b --no-pager -o short-monotonic -u luod.service -u luod.socket -u luod-reclaim.service
# The boot before, from the persistent journal (this QEMU run's snapshot).
step journal-prev journalctl -b -1 --no-pager -o short-monotonic
step journal-prev-luod journalctl -b -1 --no-pager -o short-monotonic -u luod.service -u luod.socket -u luod-reclaim.service
step kmsg-luo bash -c 'journalctl -k -b --no-pager | grep -iE "liveupdate|luo|kho" || true'
finish
