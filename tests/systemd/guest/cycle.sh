# shellcheck shell=bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# One QEMU run shared by three tests (tests/systemd/conftest.py: `cycle`):
# boot, one `luoctl kexec` (-> systemctl kexec), boot. A boot and a kexec
# under TCG cost minutes, so scenarios that do not disturb one another
# share them; step names say whose they are.
#   test_socket_activation  stage 1 first, as booted: luod.socket
#             activation and varlinkctl's view of luod (luod is stopped and
#             started again by the socket, before anything is held).
#   test_handoff  a memfd handed to luod with nothing but `varlinkctl
#             --push-fd=`; after the kexec luod-reclaim.service has run and
#             `varlinkctl --exec` gives it back.
#   test_handback  luod-test-handback.service starts with no session yet
#             (handback --optional), hands its memfd to luod and is enabled;
#             after the kexec it starts after luod-reclaim.service, its
#             ExecStartPre= pushes the fd into the unit's fd store and the
#             program finds it in LISTEN_FDNAMES without calling luod.
# shellcheck source=testsupport/systemd/guest/lib.sh
. "$LUOD_TEST_GUEST/lib.sh"

svc=ActiveState,SubState,Result,InvocationID,MainPID,NFileDescriptorStore,FileDescriptorStorePreserve
props=ActiveState,SubState,Result,InvocationID,MainPID,TriggeredBy
unit=luod-test-handback.service
ts=ActiveState,SubState,Result,ExecMainStatus,ExecMainStartTimestampMonotonic,ExecMainExitTimestampMonotonic,NFileDescriptorStore,FileDescriptorStoreMax,NotifyAccess

if [[ $STAGE == 1 ]]; then
	# --- socket activation: as booted, luod-reclaim.service has called
	# io.luod.Manager.Reclaim (varlinkctl), which may already have started
	# luod through the socket.
	step boot-socket systemctl show -p ActiveState,SubState,Listen,Triggers luod.socket
	step boot-luod systemctl show -p "$props" luod.service
	step boot-reclaim-started wait_started luod-reclaim.service
	step boot-reclaim systemctl show -p ActiveState,SubState,Result,ExecMainStatus luod-reclaim.service
	step enabled systemctl is-enabled luod.socket luod-reclaim.service
	step socket-node stat -c '%F %a %U' "$SOCK"
	# Stop luod; the socket stays. The next call must start it again.
	step stop-luod systemctl stop luod.service
	step stopped-luod systemctl show -p "$props" luod.service
	step stopped-socket systemctl show -p ActiveState,SubState luod.socket
	step first-call varlinkctl call "$SOCK" io.luod.Manager.GetStatus '{}'
	step started-luod systemctl show -p "$props" luod.service
	step info varlinkctl info "$SOCK"
	step list-interfaces varlinkctl list-interfaces "$SOCK"
	step introspect-custody varlinkctl introspect "$SOCK" io.luod.Custody
	step introspect-manager varlinkctl introspect "$SOCK" io.luod.Manager
	step list-methods varlinkctl list-methods "$SOCK"
	step list-registry varlinkctl list-registry
	step list-sockets varlinkctl list-sockets
	step no-such-session varlinkctl call "$SOCK" io.luod.Custody.RetrieveFd '{"session":"nope","name":"x"}'
	step luoctl-status luoctl --json status
	step journal-luod journalctl -b --no-pager -o short-monotonic -u luod.service -u luod.socket -u luod-reclaim.service

	# --- handoff
	step preserve python3 "$G/memfd.py" create --size 1048576 --seed handoff --pos 4096 \
		--info "$OUT/memfd.json" -- \
		varlinkctl call --push-fd=3 "$SOCK" io.luod.Custody.PreserveFd \
		'{"session":"handoff","name":"blob","fileDescriptor":0,"createSession":true}'
	step list luoctl --json list handoff

	# --- handback
	step handback-start systemctl start "$unit"
	step handback-show systemctl show -p "$ts" "$unit"
	step handback-json cat "/run/luod-test/$(basename "$unit" .service).json"
	step handback-journal-unit journalctl -b --no-pager -o short-monotonic -u "$unit"
	step handback-list luoctl --json list handback
	step handback-enable systemctl enable "$unit"

	# --- before the kexec (both)
	step status luoctl --json status
	step check luoctl check
	step luod-before-kexec systemctl show -p "$svc" luod.service
	step fdstore-before-kexec systemd-analyze fdstore luod.service
	step manager varlinkctl call /run/systemd/io.systemd.Manager io.systemd.Manager.Describe '{}'
	# shellcheck disable=SC2119 # no extra luoctl kexec arguments
	stage_kexec
	exit 1
fi

step reclaim systemctl show -p "$ts" luod-reclaim.service
step luod systemctl show -p "$svc" luod.service
step fdstore systemd-analyze fdstore luod.service

# --- handoff
step retrieve varlinkctl --exec call "$SOCK" io.luod.Custody.RetrieveFd \
	'{"session":"handoff","name":"blob"}' -- \
	python3 "$G/memfd.py" describe --fd 3 --info "$OUT/retrieved.json"
step list luoctl --json list handoff

# --- handback
step handback-show systemctl show -p "$ts" "$unit"
step handback-json cat "/run/luod-test/$(basename "$unit" .service).json"
step handback-fdstore systemd-analyze fdstore "$unit"
step handback-journal-unit journalctl -b --no-pager -o short-monotonic -u "$unit"
step handback-list luoctl --json list handback

# --- after (both)
step status luoctl --json status
step manager varlinkctl call /run/systemd/io.systemd.Manager io.systemd.Manager.Describe '{}'
step journal-luod journalctl -b --no-pager -o short-monotonic -u luod.service -u luod.socket -u luod-reclaim.service
step journal-luod-json journalctl -b --no-pager -o json -u luod.service
# The boot before, from the persistent journal (this QEMU run's snapshot).
step journal-prev journalctl -b -1 --no-pager -o short-monotonic
step journal-prev-luod journalctl -b -1 --no-pager -o short-monotonic -u luod.service -u luod.socket -u luod-reclaim.service
step kmsg-luo bash -c 'journalctl -k -b --no-pager | grep -iE "liveupdate|luo|kho" || true'
finish
