#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# vm/build-root.sh — build (or find in the cache) a Debian sid root file
# system with systemd >= 262 as PID 1, for the systemd test tier
# (tests/systemd). The root's path is the last stdout line; progress goes to
# stderr. vm/build-image.sh turns it into a bootable disk image with luod.
#
# What is in it: debootstrap --variant=minbase of Debian sid with
#   systemd systemd-sysv udev python3 kexec-tools procps iproute2 dbus
#   qemu-system-x86
# (debootstrap follows Depends only, never Recommends: QEMU comes without
# qemu-utils, ovmf, the GUI and spice modules; tests/systemd/test_qemu_cpr.py
# and examples/qemu-cpr/ run it inside the VM, under TCG)
# and luod's run-time Python dependencies (pyproject.toml [project]
# dependencies). Each of those is taken from Debian sid as python3-<name>
# when sid has it in a version that satisfies a `>=` requirement; only what
# sid lacks is installed from PyPI, with the host's pip (and so the host's
# pip configuration), as pure-Python wheels for the root's Python version,
# into the root's /usr/local/lib/python3.X/dist-packages (on the root's
# sys.path; Debian's packages never write there). Checked 2026-11-28: sid has
# python3-structlog 25.5.0 and python3-asyncvarlink 0.3.3, so nothing comes
# from PyPI today. LUOD_ROOT_FORCE_PYPI="name ..." forces PyPI for those
# (to exercise that path).
#
# Nothing from sid is installed on the host: debootstrap (from the host's own
# bookworm sources, installed here when missing) only writes into the cache
# folder. The mirror is the host's own, read from its apt sources
# (tools/private-apt.sh; LUOD_DEBIAN_MIRROR overrides it); the sid package
# lists used to pick the Python packages live in a private apt folder.
#
# Cache: ${LUOD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/luod}/root/
#   <key>/            the root (key: 12 hex of sha256 over the package list,
#                     the Python requirements, the forced-PyPI names and this
#                     script); <key>/.luod-root.json says what went in.
#   <key>.complete    written last: its presence means "cached", so a second
#                     run prints the path and does nothing else.
#   apt/              private apt state for sid
#   .lock             serializes builds
# Old roots are not removed automatically; `rm -rf` the folder to clean up.
set -euo pipefail

SUITE=${LUOD_ROOT_SUITE:-sid}
PACKAGES=(systemd systemd-sysv udev python3 kexec-tools procps iproute2 dbus qemu-system-x86)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
# shellcheck source=tools/private-apt.sh
. "$repo/tools/private-apt.sh"

log() { printf 'build-root: %s\n' "$*" >&2; }
die() {
	log "ERROR: $*"
	exit 1
}

[[ $(id -u) -eq 0 ]] || die "debootstrap needs root"

# ------------------------------------------------------------------ inputs
# luod's run-time requirements, one per line, as pyproject.toml lists them.
python_requirements() {
	python3 - "$repo/pyproject.toml" <<-'EOF'
		import sys, tomllib
		with open(sys.argv[1], "rb") as f:
		    for req in tomllib.load(f)["project"]["dependencies"]:
		        print(req.replace(" ", ""))
	EOF
}
mapfile -t requirements < <(python_requirements)
[[ ${#requirements[@]} -gt 0 ]] || die "no dependencies found in pyproject.toml"
read -r -a force_pypi <<<"${LUOD_ROOT_FORCE_PYPI:-}"

key=$(
	{
		echo "suite $SUITE"
		echo "packages ${PACKAGES[*]}"
		echo "requirements ${requirements[*]}"
		echo "force-pypi ${force_pypi[*]}"
		cat "${BASH_SOURCE[0]}"
	} | sha256sum | cut -c1-12
)
cache=${LUOD_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/luod}/root
dest=$cache/$key

if [[ -e $dest.complete && -d $dest ]]; then
	echo "$dest"
	exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/.lock"
if ! flock -n 9; then
	log "another build holds $cache/.lock; waiting"
	flock 9
fi
if [[ -e $dest.complete && -d $dest ]]; then
	echo "$dest"
	exit 0
fi

start=$(date +%s%3N)

# ---------------------------------------------------------- host packages
missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v flock >/dev/null || missing+=(util-linux)
if [[ ${#missing[@]} -gt 0 ]]; then
	log "installing ${missing[*]} from the host's own apt sources"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q >&2
	apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

# ------------------------------------------------ sid lists, Python deps
aptdir=$cache/apt
papt_init "$aptdir" "$SUITE" main || die "cannot set up the private apt folder $aptdir"
papt_update "$aptdir" || die "cannot read $SUITE's package lists (see above)"
mirror=$(papt_mirror)
keyring=$PAPT_HOST_KEYRING
bootstrapped=$aptdir/keyring/root/usr/share/keyrings/debian-archive-keyring.gpg
[[ -s $bootstrapped ]] && keyring=$bootstrapped

# in_root ROOT CMD...: chroot with the root's own /proc mounted (in a private
# mount namespace, gone when CMD ends); systemd 262's tools resolve paths
# through /proc.
in_root() {
	# shellcheck disable=SC2016 # expanded by the inner sh
	unshare --mount --propagation private -- \
		sh -c 'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"' "$@"
}

upstream_version() { # Debian version -> upstream part (no epoch, no revision)
	local v=${1#*:}
	printf '%s\n' "${v%-*}"
}

debian_python=()
pypi_python=()
provenance=()
for req in "${requirements[@]}"; do
	name=${req%%[<>=!~;[]*}
	lname=${name,,}
	lname=${lname//_/-}
	pkg=python3-$lname
	minimum=""
	[[ $req =~ \>=([^,;]+) ]] && minimum=${BASH_REMATCH[1]}
	forced=0
	for f in "${force_pypi[@]}"; do [[ ${f,,} == "$lname" ]] && forced=1; done
	candidate=$(papt_candidate "$aptdir" "$pkg")
	reason=""
	if [[ $forced == 1 ]]; then
		reason="forced by LUOD_ROOT_FORCE_PYPI"
	elif [[ -z $candidate ]]; then
		reason="$SUITE has no $pkg"
	elif [[ -n $minimum ]] && dpkg --compare-versions "$(upstream_version "$candidate")" lt "$minimum"; then
		reason="$SUITE's $pkg $candidate is older than $minimum"
	elif [[ $req =~ [\<\!~]|==|\; ]]; then
		log "note: $req has a constraint this script does not check; taking $pkg $candidate"
	fi
	if [[ -z $reason ]]; then
		log "$req: Debian $SUITE $pkg $candidate"
		debian_python+=("$pkg")
		provenance+=("$req|debian $pkg $candidate")
	else
		log "$req: from PyPI ($reason)"
		pypi_python+=("$req")
		provenance+=("$req|pypi")
	fi
done

# --------------------------------------------------------------- debootstrap
work=$cache/.build.$key
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
root=$work/root
include=$(
	IFS=,
	echo "${PACKAGES[*]}${debian_python[*]:+,${debian_python[*]}}"
)
include=${include// /,}
log "debootstrap --variant=minbase $SUITE from $mirror (keyring $keyring)"
dstart=$(date +%s)
if ! debootstrap --variant=minbase --keyring="$keyring" --include="$include" \
	"$SUITE" "$root" "$mirror" >"$work/debootstrap.log" 2>&1; then
	tail -n 30 "$work/debootstrap.log" >&2
	[[ -f $root/debootstrap/debootstrap.log ]] && tail -n 30 "$root/debootstrap/debootstrap.log" >&2
	die "debootstrap failed (log above)"
fi
log "debootstrap done in $(($(date +%s) - dstart)) s"

pyver=$(chroot "$root" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])') ||
	die "the root's python3 does not run"
if [[ ${#pypi_python[@]} -gt 0 ]]; then
	site=/usr/local/lib/python$pyver/dist-packages
	log "pip install ${pypi_python[*]} into $site (python $pyver wheels, pure Python only)"
	mkdir -p "$root$site"
	python3 -m pip install --quiet --no-compile --disable-pip-version-check \
		--target "$root$site" --python-version "$pyver" --implementation py \
		--abi none --platform any --only-binary=:all: "${pypi_python[@]}" >&2 ||
		die "pip install ${pypi_python[*]} failed"
	rm -rf "${root:?}$site/bin"
	chroot "$root" python3 -m compileall -q "$site" >/dev/null || true
fi

# ----------------------------------------------------------- configuration
# Things every test VM wants; nothing luod-specific (that is build-image.sh).
echo luod-vm >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 luod-vm\n::1 localhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
# The root is /dev/vda (virtio-blk), mounted rw by the kernel; no fsck.
printf '# written by vm/build-root.sh\n/dev/vda / ext4 rw,errors=remount-ro 0 0\n' >"$root/etc/fstab"
# A valid machine-id: the first boot is not "first boot" (no
# systemd-firstboot prompt on the console); every image shares it.
if ! [[ -s $root/etc/machine-id ]] || grep -q uninitialized "$root/etc/machine-id"; then
	rm -f "$root/etc/machine-id"
	chroot "$root" systemd-machine-id-setup >/dev/null
fi
# Root logs in on the serial console without a password (a test VM only).
chroot "$root" passwd -d root >/dev/null
chroot "$root" systemctl set-default multi-user.target >/dev/null 2>&1
# A persistent journal: inside one QEMU run (snapshot=on keeps writes until
# QEMU exits) `journalctl -b -1` after a kexec shows the boot before.
mkdir -p "$root/var/log/journal" "$root/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=persistent\n' >"$root/etc/systemd/journald.conf.d/50-luod-vm.conf"
# Timers that only cost time in a throw-away VM.
for unit in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer; do
	[[ -e $root/usr/lib/systemd/system/$unit ]] && ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*_Packages* 2>/dev/null || true
# Do now what every boot of a never-booted root would do again (the image is
# a snapshot: nothing a boot writes is kept): ldconfig.service,
# systemd-journal-catalog-update.service and systemd-update-done.service
# (ConditionNeedsUpdate=: /etc/.updated, /var/.updated older than /usr).
chroot "$root" ldconfig
in_root "$root" journalctl --update-catalog
touch -r "$root/usr" "$root/etc/.updated" "$root/var/.updated"

# What went in, for humans and for build-image.sh.
# shellcheck disable=SC2016 # dpkg-query's own ${...} format
systemd_version=$(chroot "$root" dpkg-query -W -f '${Version}' systemd)
# shellcheck disable=SC2016 # dpkg-query's own ${...} format
qemu_version=$(chroot "$root" dpkg-query -W -f '${Version}' qemu-system-x86)
python3 - "$root/.luod-root.json" "$key" "$SUITE" "$mirror" "$pyver" "$systemd_version" \
	"$qemu_version" "${provenance[@]}" <<-'EOF'
	import json, sys
	out, key, suite, mirror, pyver, systemd, qemu, *prov = sys.argv[1:]
	deps = {}
	for p in prov:
	    req, _, how = p.partition("|")
	    deps[req] = how
	json.dump({"key": key, "suite": suite, "mirror": mirror, "python": pyver,
	           "systemd": systemd, "qemu": qemu, "python_deps": deps},
	          open(out, "w"), indent=2)
	EOF
# shellcheck disable=SC2016 # dpkg-query's own ${...} format
chroot "$root" dpkg-query -W -f '${Package}=${Version}\n' >"$root/.luod-packages.txt"

rm -rf "$dest"
mv "$root" "$dest"
touch "$dest.complete"
elapsed=$(($(date +%s%3N) - start))
log "done in $((elapsed / 1000)).$(printf '%03d' $((elapsed % 1000))) s: $dest ($(du -sh "$dest" | cut -f1), systemd $systemd_version, qemu $qemu_version, python $pyver)"
echo "$dest"
