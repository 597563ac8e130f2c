#!/bin/sh
# vm/guest-init.sh — PID 1 of luod's bare test VMs (started by testsupport/vm/qemu.py).
#
# The root filesystem is the HOST's / over 9p, read-only; results go out
# through a second, writable 9p share (mount tag "results"). So:
#  - proc, sysfs, devtmpfs and tmpfs are mounted unconditionally: an
#    unmounted /proc or /sys would show the host's files through 9p, so
#    `mountpoint` and friends cannot be trusted before /proc is ours.
#  - what to run comes from the results share (.guest/env, written by the
#    harness: interpreter, program, environment), never from paths baked in
#    here, so the repository can live anywhere.
#  - the stage comes from the kernel command line (luod.test_stage=N); a
#    guest program that kexecs appends the next stage to the new command line.
#
# Per stage N it leaves in the results share: .guest/stage-N.started (guest
# uptime when init ran), stage-N.log (the program's stdout+stderr, kept off
# the serial console) and, if the program returned instead of kexec'ing,
# .guest/stage-N.exit (its exit status). Then it powers the VM off.

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

say() { echo "luod-init: $*" >/dev/console 2>/dev/null || echo "luod-init: $*"; }

poweroff_now() {
	sync
	umount /run/luod-results 2>/dev/null
	echo o >/proc/sysrq-trigger
	sleep 5
	# Still here: let PID 1 die; panic=-1 reboots, QEMU -no-reboot exits.
	exit 1
}

mount -t proc -o nosuid,nodev,noexec proc /proc || say "cannot mount /proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || say "cannot mount /sys"
# DEVTMPFS_MOUNT may have mounted /dev already; /proc is ours now, so ask it.
if ! grep -q '^[^ ]* /dev devtmpfs ' /proc/self/mounts; then
	mount -t devtmpfs devtmpfs /dev || say "cannot mount /dev"
fi
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run || say "cannot mount /run"
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null

R=/run/luod-results
mkdir -p "$R"
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 results "$R"; then
	say "cannot mount the results share"
	poweroff_now
fi

stage=1
read -r cmdline </proc/cmdline
for word in $cmdline; do
	case $word in
	luod.test_stage=*) stage=${word#luod.test_stage=} ;;
	esac
done
read -r uptime _ </proc/uptime
echo "$uptime" >"$R/.guest/stage-$stage.started"
say "stage $stage (uptime $uptime s, kernel $(uname -r))"

if [ ! -r "$R/.guest/env" ]; then
	say "no $R/.guest/env: nothing to run"
	poweroff_now
fi
export LUOD_VM_STAGE="$stage" LUOD_VM_RESULTS="$R"
# Sets more LUOD_VM_* variables and the program's argv ("set -- ...").
# shellcheck disable=SC1091
. "$R/.guest/env"

# A writable /tmp, unless that would hide what we run (a clone of the
# repository, its venv or the kernel may live under /tmp): then /tmp stays
# the host's, read-only, and TMPDIR points to a tmpfs.
hidden=""
for path in "$0" "$LUOD_VM_KERNEL" "$LUOD_VM_REPO" "$@"; do
	case $path in
	/tmp/*) hidden=$path ;;
	esac
done
if [ -z "$hidden" ]; then
	mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp || say "cannot mount /tmp"
	export HOME=/tmp
else
	say "no tmpfs on /tmp: $hidden is there; TMPDIR=/run/tmp"
	mkdir -m 1777 /run/tmp
	export TMPDIR=/run/tmp HOME=/run/tmp
fi
cd "$HOME" || exit 1

"$@" >"$R/stage-$stage.log" 2>&1 </dev/null
rc=$?
echo "$rc" >"$R/.guest/stage-$stage.exit"
read -r uptime _ </proc/uptime
say "stage $stage program exited with $rc (uptime $uptime s); powering off"
poweroff_now
