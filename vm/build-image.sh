#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# vm/build-image.sh [OPTIONS] IMAGE — a bootable ext4 disk image for the
# systemd test tier: the cached sid root of vm/build-root.sh plus luod from
# this working tree. Prints IMAGE's path as the last stdout line.
#
# Options:
#   --root DIR       root to start from (default: vm/build-root.sh's output)
#   --kernel FILE    bzImage copied to /boot/vmlinuz, what `luoctl kexec`
#                    loads in the guest (default: vm/build-kernel.sh stock)
#   --size SIZE      image size for truncate(1) (default 2G; sparse)
#   --units DIR      take the unit files from DIR instead of units/ (to try
#                    a unit change in a VM before committing it)
#   --deb FILE       install luod from its Debian package (make deb) with
#                    dpkg -i in the root, as an operator would, instead of
#                    copying luod/ and units/ (then --units is refused)
#   --no-test-stage  leave out the test hooks (results.mount,
#                    luod-test-stage.service)
#   --test-units DIR test-only units and their programs (tests/systemd/units):
#                    unit files (*.service, *.socket, ...) go next to luod's
#                    but are not enabled, everything else to /usr/lib/luod-test/
#
# With the test hooks or test units, the Python helpers the test programs
# share go in too: testsupport/{__init__,util,guest}.py of the working tree
# (never from LUOD_IMAGE_REF: they are the tests' side) as the package
# testsupport, next to luod; and the fault-injection entry point
# (testsupport/{crashhook,luod_crashable}.py: `python3 -m
# testsupport.luod_crashable` is the image's luod with LUOD_TEST_CRASH_AT).
#
# What goes in, on top of a copy of the root (the cached root is not changed),
# with --deb: the package's files instead of the first three lines:
#   /usr/lib/python3/dist-packages/luod   the luod package of the working tree
#                                         (LUOD_IMAGE_REF=<git ref> takes it
#                                         from that commit instead), byte-compiled
#   /usr/bin/luod, /usr/bin/luoctl        entry scripts (python3 -m style)
#   /usr/lib/systemd/system/              units/*; luod.socket and
#                                         luod-reclaim.service enabled
#   /usr/lib/systemd/system/<test units>  --test-units DIR: installed, not enabled
#                                         (a test enables or starts them);
#   /usr/lib/luod-test/<programs>         the other files of DIR (0755)
#   /usr/lib/python3/dist-packages/testsupport  the test programs' helpers
#                                         (see above), byte-compiled
#   /usr/lib/systemd/system/results.mount the 9p results share at /results
#   /usr/lib/systemd/system/luod-test-stage.service + /usr/lib/luod-test/test-stage
#                                         (vm/systemd/): run the host's test
#                                         program per boot stage
#   /boot/vmlinuz                         the kernel
#   /etc/luod-image.json                  what was built from what
# and then `mkfs.ext4 -d` into a sparse IMAGE. Boot it with
# root=/dev/vda rootfstype=ext4 rw init=/lib/systemd/systemd (testsupport/systemd/harness.py).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
log() { printf 'build-image: %s\n' "$*" >&2; }
die() {
	log "ERROR: $*"
	exit 1
}
usage() {
	sed -n '4,22s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
	exit 2
}

root="" kernel="" size=2G test_stage=1 image="" units="" test_units="" deb=""
while [[ $# -gt 0 ]]; do
	case $1 in
	--root) root=$2 && shift 2 ;;
	--kernel) kernel=$2 && shift 2 ;;
	--size) size=$2 && shift 2 ;;
	--units) units=$2 && shift 2 ;;
	--deb) deb=$2 && shift 2 ;;
	--no-test-stage) test_stage=0 && shift ;;
	--test-units) test_units=$2 && shift 2 ;;
	-h | --help) usage ;;
	-*) usage ;;
	*)
		[[ -z $image ]] || usage
		image=$1
		shift
		;;
	esac
done
[[ -n $image ]] || usage
[[ -z $deb || -z $units ]] || die "--deb and --units: the package has its own units"
[[ -z $deb || -s $deb ]] || die "--deb $deb: no such package"
[[ $(id -u) -eq 0 ]] || die "needs root (the root's files are root-owned; chroot)"
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 missing (e2fsprogs)"

start=$(date +%s%3N)
if [[ -z $root ]]; then
	root=$("$here/build-root.sh" | tail -n1)
fi
[[ -x $root/lib/systemd/systemd ]] || die "$root is not a root built by vm/build-root.sh"
if [[ -z $kernel ]]; then
	kernel=$("$here/build-kernel.sh" stock | tail -n1)
fi
[[ -s $kernel ]] || die "no kernel at $kernel"

image=$(realpath -m "$image")
mkdir -p "$(dirname "$image")"
stage=$(mktemp -d "$(dirname "$image")/.image.XXXXXX")
trap 'rm -rf "$stage"' EXIT
r=$stage/root

# The copy: reflinks where the file system has them, else a plain copy.
cp -a --reflink=auto "$root" "$r"

# ---------------------------------------------------------------- luod
site=$r/usr/lib/python3/dist-packages
unitdir=$r/usr/lib/systemd/system
enable=()
if [[ -n $deb ]]; then
	# As an operator installs it; the package's postinst enables luod.socket
	# and luod-reclaim.service (no systemd runs in the chroot: nothing starts).
	cp "$deb" "$r/tmp/"
	if ! chroot "$r" dpkg -i "/tmp/$(basename "$deb")" >"$stage/dpkg.log" 2>&1; then
		cat "$stage/dpkg.log" >&2
		die "dpkg -i $(basename "$deb") failed in the root"
	fi
	rm -f "$r/tmp/$(basename "$deb")"
	source_desc="package $(basename "$deb") (sha256 $(sha256sum "$deb" | cut -c1-12))"
else
# luod/ and units/ of the working tree (or LUOD_IMAGE_REF), copied in.
src=$stage/src
mkdir -p "$src"
if [[ -n ${LUOD_IMAGE_REF:-} ]]; then
	git -C "$repo" archive "$LUOD_IMAGE_REF" luod units | tar -x -C "$src"
	source_desc="git $(git -C "$repo" rev-parse "$LUOD_IMAGE_REF")"
else
	cp -a "$repo/luod" "$repo/units" "$src/"
	source_desc="working tree at $(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)"
	if [[ -n $(git -C "$repo" status --porcelain -- luod units 2>/dev/null) ]]; then
		source_desc+=" with uncommitted changes in luod/ or units/"
	fi
fi
if [[ -n $units ]]; then
	rm -rf "$src/units"
	cp -a "$units" "$src/units"
	source_desc+=", units from $units"
fi
find "$src" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$site/luod"
cp -r "$src/luod" "$site/luod"
chown -R root:root "$site/luod"
find "$site/luod" -type d -exec chmod 0755 {} + -o -type f -exec chmod 0644 {} +

for tool in luod:luod.daemon luoctl:luod.cli; do
	name=${tool%%:*}
	module=${tool#*:}
	cat >"$r/usr/bin/$name" <<-EOF
		#!/usr/bin/python3
		# Installed by vm/build-image.sh (the [project.scripts] entry point).
		import sys

		from $module import main

		sys.exit(main())
	EOF
	chmod 0755 "$r/usr/bin/$name"
done

install -m 0644 "$src"/units/* "$unitdir/"
enable=(luod.socket luod-reclaim.service)
fi
if [[ $test_stage == 1 ]]; then
	install -m 0644 "$here/systemd/results.mount" "$here/systemd/luod-test-stage.service" "$unitdir/"
	install -D -m 0755 "$here/systemd/test-stage" "$r/usr/lib/luod-test/test-stage"
	mkdir -p "$r/results"
	enable+=(results.mount luod-test-stage.service)
fi
if [[ -n $test_units ]]; then
	[[ -d $test_units ]] || die "--test-units $test_units: not a directory"
	for f in "$test_units"/*; do
		[[ -f $f ]] || continue
		case $f in
		*.service | *.socket | *.target | *.timer | *.path | *.mount) install -m 0644 "$f" "$unitdir/" ;;
		*) install -D -m 0755 "$f" "$r/usr/lib/luod-test/$(basename "$f")" ;;
		esac
	done
	source_desc+=", test units from $test_units"
fi
# The helpers of the test programs (testsupport.guest) and the crashable
# luod (testsupport.luod_crashable), for the root's python3.
testsupport=(__init__.py util.py guest.py crashhook.py luod_crashable.py)
rm -rf "$site/testsupport"
if [[ $test_stage == 1 || -n $test_units ]]; then
	for f in "${testsupport[@]}"; do
		install -D -m 0644 "$repo/testsupport/$f" "$site/testsupport/$f"
	done
fi
# The root's own systemctl, offline (it sees the chroot and makes the links).
if [[ ${#enable[@]} -gt 0 ]]; then
	chroot "$r" systemctl enable "${enable[@]}" >"$stage/enable.log" 2>&1 || {
		cat "$stage/enable.log" >&2
		die "systemctl enable ${enable[*]} failed"
	}
fi

install -D -m 0644 "$kernel" "$r/boot/vmlinuz"

# Byte-compile with the root's Python, and check that luod imports there.
chroot "$r" python3 -m compileall -q /usr/lib/python3/dist-packages/luod >/dev/null ||
	die "luod does not byte-compile with the root's python3"
if ! check=$(chroot "$r" sh -c 'luod --version && luoctl --help >/dev/null' 2>&1); then
	printf '%s\n' "$check" >&2
	die "luod does not start with the root's python3 (above)"
fi
if [[ -d $site/testsupport ]]; then
	chroot "$r" python3 -m compileall -q /usr/lib/python3/dist-packages/testsupport >/dev/null ||
		die "testsupport does not byte-compile with the root's python3"
	if ! out=$(chroot "$r" python3 -c 'import testsupport.guest' 2>&1); then
		printf '%s\n' "$out" >&2
		die "testsupport.guest does not import with the root's python3 (above)"
	fi
	# (A luod of LUOD_IMAGE_REF from before luod.crashpoint has no hook to arm.)
	if chroot "$r" python3 -c 'import luod.crashpoint' 2>/dev/null &&
		! out=$(chroot "$r" python3 -c 'import testsupport.luod_crashable' 2>&1); then
		printf '%s\n' "$out" >&2
		die "testsupport.luod_crashable does not import with the root's python3 (above)"
	fi
fi

python3 - "$r/etc/luod-image.json" "$root" "$kernel" "$source_desc" "$check" <<-'EOF'
	import hashlib, json, sys, time
	out, root, kernel, source, version = sys.argv[1:]
	with open(kernel, "rb") as f:
	    ksha = hashlib.sha256(f.read()).hexdigest()
	json.dump({"root": root, "kernel": kernel, "kernel_sha256": ksha, "luod": source,
	           "luod_version": version.strip(), "built": time.strftime("%FT%TZ", time.gmtime())},
	          open(out, "w"), indent=2)
EOF

# ---------------------------------------------------------------- image
rm -f "$image"
truncate -s "$size" "$image"
mkfs.ext4 -q -F -L luod-root -E root_owner=0:0 -d "$r" "$image" >&2 ||
	die "mkfs.ext4 -d failed"
elapsed=$(($(date +%s%3N) - start))
log "done in $((elapsed / 1000)).$(printf '%03d' $((elapsed % 1000))) s: $image ($(du -h "$image" | cut -f1) used of $size; luod from the $source_desc)"
echo "$image"
