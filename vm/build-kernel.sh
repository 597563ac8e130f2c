#!/bin/bash
# vm/build-kernel.sh [stock|magic|abi|fetch] — build (or fetch from the cache) a
# LUO kernel for the QEMU test tiers. The bzImage path is the last stdout
# line; everything else goes to stderr.
#
#   stock: Debian's linux-source-7.3 as is.
#   magic: the same plus vm/kernel/patches/*.patch (test-only: LUO session
#          files get their own pseudo-fs, f_type 0x4c554f53).
#   abi:   stock with LUO_ABI_COMPATIBLE changed (test-only: a kernel that
#          cannot take the handover of a stock one, for luod's next-kernel
#          preflight; see abi_sed below). Built from a copy of stock's kept
#          build tree, so only what includes the changed header is compiled
#          again (seconds, not the minutes of a whole build).
#   fetch: only make sure the source tarball is cached; print its path.
#
# Source: Debian's linux-source-7.3 from trixie-backports, else
# linux-source-7.2 from sid, fetched with a private apt configuration (own
# sources list, state and cache under the cache folder; the host's apt setup
# is never changed and nothing from those suites is installed: the .deb is
# only unpacked). The mirror is the host's own, read from its apt sources;
# only the suite is swapped. LUOD_DEBIAN_MIRROR overrides it.
#
# Config: `make tinyconfig`, merge vm/kernel/*.config (one config for both
# the bare 9p-root VM and the systemd VM), `make olddefconfig`, then check
# that the LUO options survived.
#
# Cache, under ${LUOD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/luod}:
#   src/linux-source-<series>_<debian version>.tar.xz  the source, reused by
#        every variant and every later build; the newest cached one is used
#        without asking the archive (LUOD_KERNEL_REFRESH=1 asks again).
#   kernel/<version>-<key>-<variant>/{bzImage,config,build.log}
#        key = first 12 hex of sha256 over the fragments (and, for magic,
#        the patches). Same inputs: no rebuild, just the path.
#   build/<version>-<key>-stock/  stock's build tree, kept (only the newest)
#        for the abi variant to start from.
#   apt/  the private apt configuration and its state.
# LUOD_KEEP_BUILD=1 keeps the build tree (build/<name>/) for inspection.
set -euo pipefail

variant=${1:-stock}
case $variant in
stock | magic | abi | fetch) ;;
*)
	echo "usage: $0 [stock|magic|abi|fetch]" >&2
	exit 2
	;;
esac

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${LUOD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/luod}
log() { echo "build-kernel: $*" >&2; }
die() {
	log "ERROR: $*"
	exit 1
}

# ---------------------------------------------------------------- inputs
# Bump when the build recipe itself changes in a way that changes the result.
recipe_version=1
fragments=("$here"/kernel/*.config)
patches=()
if [ "$variant" = magic ]; then
	shopt -s nullglob
	patches=("$here"/kernel/patches/*.patch)
	shopt -u nullglob
	[ ${#patches[@]} -gt 0 ] || die "variant magic but no patches in $here/kernel/patches"
fi
# abi: "luo-vN" becomes "luo-vN-luod-test" in include/linux/kho/abi/luo.h.
abi_file=include/linux/kho/abi/luo.h
abi_sed='s/^(#define[[:space:]]+LUO_ABI_COMPATIBLE[[:space:]]+"luo-v[0-9]+)"/\1-luod-test"/'

input_key() {
	{
		echo "luod-kernel-recipe $recipe_version"
		local f
		for f in "${fragments[@]}" "${patches[@]}"; do
			echo "== $(basename "$f")"
			cat "$f"
		done
		if [ "$variant" = abi ]; then
			echo "== sed $abi_file: $abi_sed"
		fi
	} | sha256sum | cut -c1-12
}
key=$(input_key)

# The newest cached source tarball, preferring 7.3 over 7.2.
cached_source() {
	local series f
	for series in 7.3 7.2; do
		f=$(ls -1 "$cache/src/linux-source-${series}_"*.tar.xz 2>/dev/null | sort -V | tail -n1)
		if [ -n "$f" ]; then
			echo "$f"
			return 0
		fi
	done
	return 1
}

# ------------------------------------------------------------ warm path
if [ "$variant" != fetch ] && [ "${LUOD_KERNEL_REFRESH:-0}" != 1 ] && src_tar=$(cached_source); then
	srcversion=$(basename "$src_tar" .tar.xz)
	srcversion=${srcversion#linux-source-*_}
	out="$cache/kernel/$srcversion-$key-$variant"
	if [ -s "$out/bzImage" ]; then
		echo "$out/bzImage"
		exit 0
	fi
fi

# ------------------------------------------------------------ cold path
start=$(date +%s)
"$here/host-deps.sh" build
if [ "$variant" = abi ]; then
	# Before taking the lock below: stock's build takes it too.
	"$here/build-kernel.sh" stock >/dev/null
fi
mkdir -p "$cache/src" "$cache/kernel" "$cache/build"

# Serialize concurrent builds in the same cache (two test runs, two users).
exec 9>"$cache/build/.lock"
if ! flock -n 9; then
	log "another build holds $cache/build/.lock; waiting"
	flock 9
fi

host_mirror() {
	if [ -n "${LUOD_DEBIAN_MIRROR:-}" ]; then
		echo "$LUOD_DEBIAN_MIRROR"
		return
	fi
	local uri=""
	if [ -r /etc/apt/sources.list.d/debian.sources ]; then
		# deb822: the first "Types: deb" stanza that is not the security archive.
		uri=$(awk 'BEGIN { RS = ""; FS = "\n" }
			{
				types = ""; uris = ""; suites = ""
				for (i = 1; i <= NF; i++) {
					if ($i ~ /^Types:/) { types = $i }
					if ($i ~ /^URIs:/) { uris = $i; sub(/^URIs:[ \t]*/, "", uris) }
					if ($i ~ /^Suites:/) { suites = $i }
				}
				if (types ~ /[ \t]deb([ \t]|$)/ && uris != "" && suites !~ /-security/ && uris !~ /security/) {
					split(uris, u, /[ \t]+/); print u[1]; exit
				}
			}' /etc/apt/sources.list.d/debian.sources)
	fi
	if [ -z "$uri" ] && [ -r /etc/apt/sources.list ]; then
		# one-line format: deb [options] URI suite components...
		uri=$(awk '$1 == "deb" {
				i = 2
				if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
				if ($i !~ /security/ && $(i + 1) !~ /-security/) { print $i; exit }
			}' /etc/apt/sources.list)
	fi
	[ -n "$uri" ] || die "cannot find the host's Debian mirror in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list; set LUOD_DEBIAN_MIRROR"
	echo "${uri%/}"
}

apt_dir="$cache/apt"
apt_opts=(
	-o "Dir::Etc::sourcelist=$apt_dir/sources.list"
	-o "Dir::Etc::sourceparts=$apt_dir/empty.d"
	-o "Dir::Etc::preferences=$apt_dir/preferences"
	-o "Dir::Etc::preferencesparts=$apt_dir/empty.d"
	-o "Dir::State=$apt_dir/state"
	-o "Dir::State::status=$apt_dir/state/status"
	-o "Dir::Cache=$apt_dir/cache"
	-o "APT::Architecture=amd64"
	-o "APT::Sandbox::User=root"
	-o "Debug::NoLocking=1"
	-o "Acquire::Languages=none"
)

# Write the private sources list, signed by KEYRING, and update. Returns
# non-zero (with apt's output in $apt_dir/update.log) on failure.
private_update() {
	local keyring=$1 mirror
	mirror=$(host_mirror)
	mkdir -p "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/empty.d"
	: >"$apt_dir/state/status"
	: >"$apt_dir/preferences"
	cat >"$apt_dir/sources.list" <<-EOF
		deb [signed-by=$keyring] $mirror trixie-backports main
		deb [signed-by=$keyring] $mirror sid main
	EOF
	apt-get "${apt_opts[@]}" update >"$apt_dir/update.log" 2>&1 &&
		! grep -qE '^(W|E): .*(NO_PUBKEY|EXPKEYSIG|not signed|signatures (were )?invalid|is not signed)' "$apt_dir/update.log"
}

# The archive signs trixie-backports and sid with the bookworm key as well as
# the trixie one (checked 2026-11-28), so the host's bookworm keyring
# normally suffices. When it does not (an older bookworm keyring that lacks
# a key now in use), take the newest debian-archive-keyring that the host's
# OWN signed bookworm indexes offer: apt verifies that .deb's sha256 against
# the signed Packages index; it is only unpacked, never installed. No
# [trusted=yes] anywhere. If even that cannot verify the archive, stop.
setup_private_apt() {
	local keyring=${LUOD_APT_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
	if private_update "$keyring"; then
		return 0
	fi
	log "apt update with $keyring failed:"
	tail -n 5 "$apt_dir/update.log" >&2
	log "bootstrapping a newer debian-archive-keyring from the host's signed bookworm archive"
	local kdir="$apt_dir/keyring"
	rm -rf "$kdir" && mkdir -p "$kdir"
	(cd "$kdir" && apt-get -o APT::Sandbox::User=root download debian-archive-keyring) >&2 ||
		die "cannot download debian-archive-keyring with the host's apt configuration (run apt-get update?)"
	dpkg-deb -x "$kdir"/debian-archive-keyring_*.deb "$kdir/x"
	keyring="$kdir/x/usr/share/keyrings/debian-archive-keyring.gpg"
	[ -s "$keyring" ] || die "the downloaded debian-archive-keyring has no $keyring"
	if ! private_update "$keyring"; then
		tail -n 20 "$apt_dir/update.log" >&2
		die "cannot verify trixie-backports/sid with the host's keyring nor with bookworm's newest keyring; refusing to fetch unverified sources"
	fi
}

fetch_source() {
	setup_private_apt
	local pkg suite version deb tmp
	for pkg_suite in linux-source-7.3:trixie-backports linux-source-7.2:sid; do
		pkg=${pkg_suite%%:*}
		suite=${pkg_suite#*:}
		version=$(apt-cache "${apt_opts[@]}" madison "$pkg" 2>/dev/null |
			awk -F' *[|] *' -v s=" $suite/" 'index($3, s) { print $2 }' | sort -V | tail -n1)
		if [ -n "$version" ]; then
			break
		fi
		log "$pkg not found in $suite"
	done
	[ -n "$version" ] || die "neither linux-source-7.3 (trixie-backports) nor linux-source-7.2 (sid) found"
	local series=${pkg#linux-source-}
	local dest="$cache/src/${pkg}_${version}.tar.xz"
	if [ -s "$dest" ]; then
		echo "$dest"
		return
	fi
	log "downloading $pkg $version ($suite)"
	tmp=$(mktemp -d "$cache/src/.fetch.XXXXXX")
	(cd "$tmp" && apt-get "${apt_opts[@]}" download "$pkg=$version") >&2
	deb=$(ls "$tmp"/*.deb)
	dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" "./usr/src/linux-source-$series.tar.xz"
	mv "$tmp/usr/src/linux-source-$series.tar.xz" "$dest"
	rm -rf "$tmp"
	# Older tarballs would never be used again (the newest wins): drop them.
	find "$cache/src" -maxdepth 1 -name 'linux-source-*.tar.xz' ! -path "$dest" -delete
	echo "$dest"
}

if [ "${LUOD_KERNEL_REFRESH:-0}" = 1 ] || ! src_tar=$(cached_source); then
	src_tar=$(fetch_source)
fi
if [ "$variant" = fetch ]; then
	log "source: $src_tar"
	echo "$src_tar"
	exit 0
fi
srcversion=$(basename "$src_tar" .tar.xz)
srcversion=${srcversion#linux-source-*_}
series=$(basename "$src_tar")
series=${series#linux-source-}
series=${series%%_*}
name="$srcversion-$key-$variant"
out="$cache/kernel/$name"
if [ -s "$out/bzImage" ]; then # built meanwhile by whoever held the lock
	echo "$out/bzImage"
	exit 0
fi

build="$cache/build/$name"
rm -rf "$build"
mkdir -p "$build"
buildlog="$build/build.log"
stock_build="$cache/build/$srcversion-$(
	variant=stock
	input_key
)-stock"
tree="$build/linux-source-$series"
derived=0
if [ "$variant" = abi ] && [ -s "$stock_build/linux-source-$series/arch/x86/boot/bzImage" ]; then
	# The same source and config as stock: copy its tree with the times of
	# its files, so that make compiles again only what the sed below touches.
	log "starting from stock's build tree $stock_build"
	cp -a "$stock_build/." "$build/"
	: >"$buildlog"
	derived=1
else
	log "unpacking $(basename "$src_tar") into $build"
	tar -C "$build" -xf "$src_tar"
fi
[ -f "$tree/Makefile" ] || die "unexpected source layout in $src_tar"

for p in "${patches[@]}"; do
	log "applying $(basename "$p")"
	patch -d "$tree" -p1 --batch --forward <"$p" >&2 || die "patch $(basename "$p") does not apply to $srcversion"
done

if [ "$variant" = abi ]; then
	log "changing LUO_ABI_COMPATIBLE in $abi_file"
	sed -i -E "$abi_sed" "$tree/$abi_file"
	grep -qE '^#define[[:space:]]+LUO_ABI_COMPATIBLE[[:space:]]+"luo-v[0-9]+-luod-test"' "$tree/$abi_file" ||
		die "LUO_ABI_COMPATIBLE not found in $abi_file of $srcversion"
fi

jobs=$(nproc)
export KBUILD_BUILD_USER=luod KBUILD_BUILD_HOST=luod-vm
mk() { make -C "$tree" -j"$jobs" LOCALVERSION="-luod-$variant" "$@"; }

run_logged() { # run a step, output to the build log; show its tail on failure
	if ! "$@" >>"$buildlog" 2>&1; then
		tail -n 40 "$buildlog" >&2
		die "failed: $* (full log: $buildlog)"
	fi
}

if [ "$derived" = 0 ]; then
	log "configuring (tinyconfig + ${fragments[*]##*/})"
	run_logged mk tinyconfig
	run_logged env -C "$tree" scripts/kconfig/merge_config.sh -m .config "${fragments[@]}"
	run_logged mk olddefconfig
fi

# What olddefconfig dropped: LUO and the VM essentials are fatal, the rest
# is reported.
required=(KEXEC_HANDOVER LIVEUPDATE LIVEUPDATE_MEMFD KEXEC_FILE MEMFD_CREATE SHMEM
	9P_FS NET_9P_VIRTIO VIRTIO_PCI SERIAL_8250_CONSOLE DEVTMPFS)
fatal=()
for opt in "${required[@]}"; do
	grep -qx "CONFIG_$opt=y" "$tree/.config" || fatal+=("CONFIG_$opt")
done
dropped=()
while IFS= read -r line; do
	grep -qxF "$line" "$tree/.config" || dropped+=("${line%%=*}")
done < <(grep -h '^CONFIG_.*=y$' "${fragments[@]}" | sort -u)
if [ ${#dropped[@]} -gt 0 ]; then
	log "WARNING: requested but not in the final .config: ${dropped[*]}"
fi
if [ ${#fatal[@]} -gt 0 ]; then
	die "olddefconfig dropped required options: ${fatal[*]} (see $tree/.config)"
fi

log "building bzImage with -j$jobs (log: $buildlog)"
bstart=$(date +%s)
run_logged mk bzImage
log "bzImage built in $(($(date +%s) - bstart)) s"

tmpout=$(mktemp -d "$cache/kernel/.$name.XXXXXX")
chmod 755 "$tmpout"
cp "$tree/arch/x86/boot/bzImage" "$tmpout/bzImage"
cp "$tree/.config" "$tmpout/config"
cp "$buildlog" "$tmpout/build.log"
{
	echo "source=$(basename "$src_tar")"
	echo "variant=$variant"
	echo "key=$key"
	echo "release=$(make -s -C "$tree" LOCALVERSION="-luod-$variant" kernelrelease 2>/dev/null)"
	echo "patches=${patches[*]##*/}"
	echo "built=$(date -u +%FT%TZ)"
} >"$tmpout/info"
rm -rf "$out"
mv "$tmpout" "$out"
if [ "$variant" = stock ]; then
	# Kept for the abi variant; older stock trees go.
	for d in "$cache"/build/*-stock; do
		[ "$d" = "$build" ] || rm -rf "$d"
	done
elif [ "${LUOD_KEEP_BUILD:-0}" != 1 ]; then
	rm -rf "$build"
fi
log "done in $(($(date +%s) - start)) s: $out"
echo "$out/bzImage"
