# shellcheck shell=bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# tests/systemd/test_coexistence.py, two stages (one kexec) for four scenarios:
#   kill     `systemctl kill -s KILL luod.service`: restarted, same fd store
#   coexist  a LUOSession= unit, a FileDescriptorStorePreserve= unit and luod's
#            sessions over the same kexec; the LUOSession= unit is started
#            during a 1,000-memfd hand-off to luod; AdoptSession of 'systemd'
#   journal  luod's native journal fields (-o verbose / -o json)
#   ordering luod-test-wants-fds.service (After=/Wants=luod-reclaim.service)
#            gets its memfd from luod at boot on the first try
# shellcheck source=testsupport/systemd/guest/lib.sh
. "$LUOD_TEST_GUEST/lib.sh"

svc=ActiveState,SubState,Result,InvocationID,MainPID,NRestarts,NFileDescriptorStore
ts=ActiveState,Result,ExecMainStatus,ExecMainStartTimestampMonotonic,ExecMainExitTimestampMonotonic,InactiveExitTimestampMonotonic,ActiveEnterTimestampMonotonic

push() { # SESSION NAME SIZE INFO: a memfd of known bytes, with varlinkctl only
	python3 "$G/memfd.py" create --size "$3" --seed "$1/$2" --pos 4096 --info "$4" -- \
		varlinkctl call --push-fd=3 "$SOCK" io.luod.Custody.PreserveFd \
		"{\"session\":\"$1\",\"name\":\"$2\",\"fileDescriptor\":0,\"createSession\":true}"
}

if [[ $STAGE == 1 ]]; then
	# PID 1 alone: a memfd in a service's own fd store.
	step fdstore-start systemctl start luod-test-fdstore.service
	step fdstore-json cat /run/luod-test/luod-test-fdstore.json
	# luod: two sessions handed over with varlinkctl.
	step preserve-keep push keep blob 1048576 "$OUT/keep.json"
	step preserve-ordering push ordering blob 65536 "$OUT/ordering.json"
	# A session named 'systemd' (PID 1's): luod must refuse to adopt it.
	step adopt-systemd python3 -c '
import os, sys
from luod.client import VarlinkError, connect
from luod.kernel.backend import KernelBackend
fd = KernelBackend().create_session("systemd")
try:
    with connect() as c:
        c.adopt_session(fd)
except VarlinkError as e:
    print(e.error)
    sys.exit(3)
finally:
    os.close(fd)  # unpreserved: PID 1 creates its own at shutdown
print("adopted")
'

	# settle: a take under PID 1's fd store. luod preserves the session's
	# other file into a new session and tells PID 1 to drop the old one,
	# which PID 1 does when it gets to it: until then the file is busy
	# (EBUSY), and luod waits for PID 1 by a notify barrier (Carrier.settle).
	step preserve-settle-a push settle a 65536 "$OUT/settle-a.json"
	step preserve-settle-b push settle b 65536 "$OUT/settle-b.json"
	step take-settle-a varlinkctl --exec call "$SOCK" io.luod.Custody.RetrieveFd \
		'{"session":"settle","name":"a","take":true}' -- \
		python3 "$G/memfd.py" describe --fd 3 --info "$OUT/settle-a-taken.json"
	step journal-settle journalctl -b --no-pager -o short-monotonic -u luod.service

	# kill: SIGKILL luod, wait for systemd to restart it (Restart=on-failure).
	step luod-before-kill systemctl show -p "$svc" luod.service
	step list-before-kill luoctl --json list
	step fdstore-before-kill systemd-analyze fdstore luod.service
	oldpid=$(systemctl show -P MainPID luod.service)
	step kill systemctl kill -s KILL luod.service
	step_sh wait-restart "for i in \$(seq 600); do
		[[ \$(systemctl show -P ActiveState luod.service) == active &&
		   \$(systemctl show -P MainPID luod.service) != @(0|$oldpid) ]] && exit 0
		sleep 0.1; done; exit 1"
	step luod-after-kill systemctl show -p "$svc" luod.service
	step fdstore-after-kill systemd-analyze fdstore luod.service
	step list-after-kill luoctl --json list
	step journal-kill journalctl -b --no-pager -o short-monotonic -u luod.service

	# coexist: a LUOSession= unit started while luod takes 1,000 memfds;
	# bulk.py goes on with more until busy.stop exists, so the unit starts
	# inside the hand-off however fast luod is.
	rm -f "$OUT/busy.mark" "$OUT/busy.stop"
	python3 "$G/bulk.py" luod --count 1000 --session busy --info "$OUT/busy.json" \
		--mark "$OUT/busy.mark" --until "$OUT/busy.stop" >"$OUT/busy.log" 2>&1 &
	bulk=$!
	step_sh wait-busy "for i in \$(seq 1200); do [[ -e $OUT/busy.mark ]] && exit 0; sleep 0.05; done; exit 1"
	step luosession-start systemctl start luod-test-luosession.service
	step luosession-show systemctl show -p "$ts" luod-test-luosession.service
	touch "$OUT/busy.stop"
	wait "$bulk"
	echo "$?" >"$OUT/busy.rc"
	step luosession-json cat /run/luod-test/luod-test-luosession.json
	step luosession-journal journalctl -b --no-pager -o short-monotonic -u luod-test-luosession.service

	# journal: luod's own fields.
	step journal-verbose journalctl -b --no-pager -o verbose -u luod.service
	step journal-json journalctl -b --no-pager -o json -u luod.service

	# ordering: a service that wants its fds at boot, from the next boot on.
	step enable-wants systemctl enable luod-test-wants-fds.service

	step list luoctl --json list
	step fdstore-luod systemd-analyze fdstore luod.service
	step fdstore-own systemd-analyze fdstore luod-test-fdstore.service
	step fdstore-luosession systemd-analyze fdstore luod-test-luosession.service
	# shellcheck disable=SC2119 # no extra luoctl kexec arguments
	stage_kexec
	exit 1
fi

step reclaim systemctl show -p "$ts" luod-reclaim.service
step wants systemctl show -p "$ts" luod-test-wants-fds.service
step wants-json cat /run/luod-test/luod-test-wants-fds.json
# The order is checked by the units' timestamps; the chains are for a person
# looking into a boot (about 12 s each under TCG: LUOD_SYSTEMD_ANALYZE=1).
if analyze_boot; then
	step critical-chain systemd-analyze critical-chain --no-pager luod-test-wants-fds.service
	step critical-chain-reclaim systemd-analyze critical-chain --no-pager luod-reclaim.service
fi
step status luoctl --json status
step list luoctl --json list
step fdstore-luod systemd-analyze fdstore luod.service
step retrieve-keep varlinkctl --exec call "$SOCK" io.luod.Custody.RetrieveFd \
	'{"session":"keep","name":"blob"}' -- \
	python3 "$G/memfd.py" describe --fd 3 --info "$OUT/keep-after.json"
step retrieve-settle varlinkctl --exec call "$SOCK" io.luod.Custody.RetrieveFd \
	'{"session":"settle","name":"b"}' -- \
	python3 "$G/memfd.py" describe --fd 3 --info "$OUT/settle-b-after.json"
step fdstore-own systemd-analyze fdstore luod-test-fdstore.service
step fdstore-luosession systemd-analyze fdstore luod-test-luosession.service
step fdstore-start systemctl start luod-test-fdstore.service
step fdstore-json cat /run/luod-test/luod-test-fdstore.json
step luosession-start systemctl start luod-test-luosession.service
step luosession-json cat /run/luod-test/luod-test-luosession.json
step luosession-journal journalctl -b --no-pager -o short-monotonic -u luod-test-luosession.service
step journal-luod-json journalctl -b --no-pager -o json -u luod.service -u luod-reclaim.service
step journal-prev-luod-json journalctl -b -1 --no-pager -o json -u luod.service -u luod-reclaim.service
step journal-luod journalctl -b --no-pager -o short-monotonic -u luod.service -u luod.socket -u luod-reclaim.service
step_sh journal-luo 'journalctl -b --no-pager -o short-monotonic | grep -iE "luo|fd store" || true'
finish
