# shellcheck shell=bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# The guest side of bench/systemd.py (one stage, no kexec): the same N
# memfds into luod (PreserveFds batches) and into a service's own fd store
# (sd_notify FDSTORE=1), in one transient service that has an fd store.
# shellcheck source=testsupport/systemd/guest/lib.sh
. "$LUOD_TEST_GUEST/lib.sh"

count=$(cat "$G/bench-count" 2>/dev/null || echo 1000)
step luod-up luoctl --json status
step compare systemd-run --wait --pipe --quiet --unit=luod-bench-fdstore \
	-p Type=oneshot -p NotifyAccess=main -p "FileDescriptorStoreMax=$((count + 64))" \
	python3 "$G/bulk.py" compare --count "$count" --info "$OUT/bench.json"
step journal-luod journalctl -b --no-pager -o short-monotonic -u luod.service
finish
