# shellcheck shell=bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# The Debian package, two stages. 1: what the image's `dpkg -i` installed;
# a memfd handed to luod; the package upgraded in place (luod restarts and
# finds it in its fd store); `luoctl kexec`. 2: the memfd is back, byte for
# byte; removal refused while luod holds it; removal with
# LUOD_REMOVE_RELEASES=1 (luod stopped, its fd store closed); purge.
# shellcheck source=testsupport/systemd/guest/lib.sh
. "$LUOD_TEST_GUEST/lib.sh"

svc=ActiveState,SubState,InvocationID,MainPID,NFileDescriptorStore
state() { dpkg-query -W -f '${Version} ${db:Status-Abbrev}' luod; }

if [[ $STAGE == 1 ]]; then
	upgrade=$(ls "$G"/luod_*+upgrade*_all.deb)
	step installed state
	step enabled systemctl is-enabled luod.socket luod-reclaim.service luod.service
	step files bash -c 'ls /usr/share/man/man8/luod.8.gz /usr/share/man/man1/luoctl.1.gz /usr/share/man/man7/luod.varlink.7.gz /usr/share/bash-completion/completions/luoctl /usr/lib/luod/luod.conf'
	step preserve python3 "$G/memfd.py" create --size 65536 --seed package --pos 0 \
		--info "$OUT/memfd.json" -- \
		varlinkctl call --push-fd=3 "$SOCK" io.luod.Custody.PreserveFd \
		'{"session":"pkg","name":"blob","fileDescriptor":0,"createSession":true}'
	step before-upgrade systemctl show -p "$svc" luod.service
	step upgrade dpkg -i "$upgrade"
	step upgraded state
	step after-upgrade systemctl show -p "$svc" luod.service
	step list luoctl --json list
	step check luoctl check
	# shellcheck disable=SC2119 # no extra luoctl kexec arguments
	stage_kexec
	exit 1
fi

step reclaim-started wait_started luod-reclaim.service
step reclaim systemctl show -p ActiveState,SubState,Result luod-reclaim.service
step retrieve varlinkctl --exec call "$SOCK" io.luod.Custody.RetrieveFd \
	'{"session":"pkg","name":"blob"}' -- \
	python3 "$G/memfd.py" describe --fd 3 --info "$OUT/retrieved.json"
step remove-refused dpkg -r luod
step refused-state state
step refused-luod systemctl show -p "$svc" luod.service
step remove env LUOD_REMOVE_RELEASES=1 dpkg -r luod
step removed-state state
step removed-luod systemctl show -p "$svc" luod.service
step removed-files bash -c 'ls /usr/bin/luod /usr/bin/luoctl /run/luod/io.luod 2>&1; true'
step purge dpkg --purge luod
step journal-luod journalctl -b --no-pager -o short-monotonic -u luod.service -u luod.socket -u luod-reclaim.service
step journal-prev-luod journalctl -b -1 --no-pager -o short-monotonic -u luod.service -u luod.socket
finish
