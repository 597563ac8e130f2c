# shellcheck shell=bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# tests/systemd/test_handback.py, two stages (one kexec): fds handed back
# into a service's own fd store by `luoctl handback` (ExecStartPre=).
#   stage 1  luod-test-handback.service starts with no session yet (handback
#            --optional), creates its memfd and hands it to luod; enabled.
#   stage 2  after `luoctl kexec` it starts at boot after luod-reclaim.service;
#            its ExecStartPre= pushes the fd into the unit's fd store and the
#            program finds it in LISTEN_FDNAMES without calling luod.
# shellcheck source=testsupport/systemd/guest/lib.sh
. "$LUOD_TEST_GUEST/lib.sh"

unit=luod-test-handback.service
ts=ActiveState,SubState,Result,ExecMainStatus,ExecMainStartTimestampMonotonic,ExecMainExitTimestampMonotonic,NFileDescriptorStore,FileDescriptorStoreMax,NotifyAccess

if [[ $STAGE == 1 ]]; then
	step start systemctl start "$unit"
	step show systemctl show -p "$ts" "$unit"
	step json cat "/run/luod-test/$(basename "$unit" .service).json"
	step journal-unit journalctl -b --no-pager -o short-monotonic -u "$unit"
	step list luoctl --json list handback
	step enable systemctl enable "$unit"
	# shellcheck disable=SC2119 # no extra luoctl kexec arguments
	stage_kexec
	exit 1
fi

step reclaim systemctl show -p "$ts" luod-reclaim.service
step show systemctl show -p "$ts" "$unit"
step json cat "/run/luod-test/$(basename "$unit" .service).json"
step fdstore systemd-analyze fdstore "$unit"
step journal-unit journalctl -b --no-pager -o short-monotonic -u "$unit"
step journal-luod-json journalctl -b --no-pager -o json -u luod.service
step list luoctl --json list handback
step journal-luod journalctl -b --no-pager -o short-monotonic -u luod.service -u luod.socket -u luod-reclaim.service
finish
