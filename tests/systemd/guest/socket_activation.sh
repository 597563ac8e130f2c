# shellcheck shell=bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Scenario (a), one stage: luod.socket activation and varlinkctl's view of luod.
# shellcheck source=testsupport/systemd/guest/lib.sh
. "$LUOD_TEST_GUEST/lib.sh"

props=ActiveState,SubState,Result,InvocationID,MainPID,TriggeredBy
# As booted: luod-reclaim.service has called io.luod.Manager.Reclaim
# (varlinkctl), which may already have started luod through the socket.
step boot-socket systemctl show -p ActiveState,SubState,Listen,Triggers luod.socket
step boot-luod systemctl show -p "$props" luod.service
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
finish
