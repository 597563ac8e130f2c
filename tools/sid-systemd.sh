#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Make systemd >= 262's varlinkctl and systemd-analyze runnable on a host
# with an older systemd (Debian bookworm has 252), without installing
# anything: the .debs of Debian sid's systemd and its run-time libraries are
# fetched through a private apt configuration (tools/private-apt.sh), unpacked
# with `dpkg -x` into a cache folder, and started through sid's own dynamic
# loader with sid's library folders first in the search path.
#
# Usage: tools/sid-systemd.sh
#   Prints progress on stderr and the bin folder (holding `varlinkctl` and
#   `systemd-analyze` wrappers) as the last line on stdout.  A second run
#   finds the cache complete, does nothing else and prints the same line.
#
# Environment:
#   LUOD_CACHE            cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/luod)
#   LUOD_SID_SUITE        suite to take systemd from (default sid)
#   LUOD_SID_MIN_VERSION  lowest acceptable systemd major version (default 262)
#   LUOD_DEBIAN_MIRROR    mirror URI; default: taken from the host's apt sources
#
# Layout: $LUOD_CACHE/sid-systemd/
#   apt/                 private apt state (lists, cache) shared by all keys
#   <key>/root/          the unpacked packages
#   <key>/bin/           wrappers: varlinkctl, systemd-analyze
#   <key>/packages.txt   package=version as fetched
#   <key>/.complete      written last; its presence means "cached"
# <key> is derived from the suite, the architecture, the package list and the
# recipe version below, so changing any of them fetches into a new folder.
#
# The package set: ldd through sid's loader shows that varlinkctl and
# systemd-analyze link only libc, libm and systemd's private libraries
# (libsystemd-shared-262.so, libsystemd-core-262.so); everything else
# (libmount, libseccomp, libselinux, ...) systemd 262 dlopen()s when needed.
# PACKAGES below are those plus the dlopen()ed libraries that
# `systemd-analyze verify` and `systemd-analyze security` load (found with
# LD_DEBUG=libs).  What they need in turn (libmount1 links libsystemd0, libc6
# needs libgcc-s1, ...) is taken from sid's own Depends: apt resolves the
# closure against an empty dpkg status.  Anything still missing would silently
# come from the host's /lib through the loader's default path, so after
# unpacking this script checks that every library in the root resolves
# inside the root, and fails otherwise.

set -euo pipefail

RECIPE_VERSION=1
PACKAGES=(
    systemd libsystemd-shared libc6
    # dlopen()ed by systemd-analyze verify/security:
    libmount1 libblkid1 libseccomp2 libselinux1 libpcre2-8-0
)
TOOLS=(varlinkctl systemd-analyze)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tools/private-apt.sh
. "$here/private-apt.sh"

log() { printf 'sid-systemd: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

suite=${LUOD_SID_SUITE:-sid}
min_version=${LUOD_SID_MIN_VERSION:-262}
arch=$(dpkg --print-architecture)
case $arch in
amd64)
    triplet=x86_64-linux-gnu
    loader=ld-linux-x86-64.so.2
    ;;
arm64)
    triplet=aarch64-linux-gnu
    loader=ld-linux-aarch64.so.1
    ;;
*) die "architecture $arch is not supported" ;;
esac

cache_root=${LUOD_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/luod}/sid-systemd
key=$(printf '%s\n' "$RECIPE_VERSION" "$suite" "$arch" "${PACKAGES[@]}" | sha256sum | cut -c1-16)
dest=$cache_root/$key

if [[ -e $dest/.complete ]]; then
    printf '%s\n' "$dest/bin"
    exit 0
fi

mkdir -p "$cache_root"
exec 9>"$cache_root/.lock"
flock 9
# Someone else may have finished while we waited for the lock.
if [[ -e $dest/.complete ]]; then
    printf '%s\n' "$dest/bin"
    exit 0
fi

start=$(date +%s%3N)
work=$(mktemp -d "$cache_root/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

aptdir=$cache_root/apt
log "fetching systemd from Debian $suite into $dest"
papt_init "$aptdir" "$suite" main
# Exit status 75 (EX_TEMPFAIL) means "the mirror cannot be reached": callers
# (tests/sidtools.py) skip instead of failing, and say so.
unreachable() {
    grep -qiE 'Could not resolve|Could not connect|Temporary failure resolving|Connection timed out|Unable to connect|Network is unreachable|No route to host|Connection refused|Connection failed' "$1"
}
if ! papt_update "$aptdir"; then
    if unreachable "$aptdir/update.log"; then
        log "error: the Debian mirror $(papt_mirror) cannot be reached"
        exit 75
    fi
    die "cannot read the package lists of $suite"
fi

# The dependency closure, as apt would install it on an empty system.
mapfile -t versions < <(
    papt_get "$aptdir" install --simulate --no-install-recommends "${PACKAGES[@]}" 2>&1 |
        sed -n 's/^Inst \([^ ]*\) (\([^ ]*\) .*/\1=\2/p'
)
[[ ${#versions[@]} -ge ${#PACKAGES[@]} ]] ||
    die "cannot resolve ${PACKAGES[*]} in $suite: $(papt_get "$aptdir" install --simulate --no-install-recommends "${PACKAGES[@]}" 2>&1 | tail -n3)"
log "packages: ${versions[*]}"

mkdir -p "$work/debs"
if ! (cd "$work/debs" && papt_get "$aptdir" download "${versions[@]}") >"$work/download.log" 2>&1; then
    cat "$work/download.log" >&2
    if unreachable "$work/download.log"; then
        log "error: the Debian mirror $(papt_mirror) cannot be reached"
        exit 75
    fi
    die "apt-get download failed"
fi
grep -E '^(Get|Fetched)' "$work/download.log" >&2 || true
rm -f "$work/download.log"

mkdir -p "$work/root"
for deb in "$work"/debs/*.deb; do
    dpkg -x "$deb" "$work/root"
done
printf '%s\n' "${versions[@]}" >"$work/packages.txt"
rm -rf "$work/debs"

root=$work/root
ld_so=$root/usr/lib/$triplet/$loader
[[ -x $ld_so ]] || die "no $loader in $suite's libc6"
libdirs=()
for d in "usr/lib/$triplet" "lib/$triplet" "usr/lib/$triplet/systemd"; do
    [[ -d $root/$d ]] && libdirs+=("$d")
done
library_path() { # ROOT -> the --library-path argument
    local r=$1 out="" d
    for d in "${libdirs[@]}"; do out+=${out:+:}$r/$d; done
    printf '%s' "$out"
}

# Every binary we run and every shared library in the root must resolve all
# of its DT_NEEDED entries inside the root.
lp=$(library_path "$root")
bad=0
while IFS= read -r -d '' f; do
    case $f in
    *.so | *.so.*) ;;
    *) [[ $f == "$root/usr/bin/"* ]] || continue ;;
    esac
    out=$("$ld_so" --inhibit-cache --library-path "$lp" --list "$f" 2>&1) || {
        # Not a dynamic ELF object (linker script, data file): skip.
        grep -q 'not a dynamic executable\|cannot be preloaded\|invalid ELF header\|file too short' <<<"$out" && continue
        log "ldd failed for ${f#"$root"/}: $out"
        bad=1
        continue
    }
    while read -r line; do
        case $line in
        *"=> not found"*)
            log "${f#"$root"/}: ${line%% *} not found"
            bad=1
            ;;
        *"=> /"*)
            target=${line#*=> }
            target=${target%% (*}
            if [[ $target != "$root/"* ]]; then
                log "${f#"$root"/}: ${line%% *} resolves outside the root: $target"
                bad=1
            fi
            ;;
        esac
    done <<<"$out"
done < <(find "$root/usr/bin" -maxdepth 1 \( -name varlinkctl -o -name systemd-analyze \) -print0
         find "${libdirs[@]/#/$root/}" -maxdepth 1 -type f -name '*.so*' -print0)
[[ $bad == 0 ]] || die "the unpacked root is not self-contained; add the packages above to PACKAGES"

# Wrappers find the root relative to themselves, so the folder may be moved.
mkdir -p "$work/bin"
for tool in "${TOOLS[@]}"; do
    [[ -x $root/usr/bin/$tool ]] || die "$suite's systemd has no /usr/bin/$tool"
    # shellcheck disable=SC2016 # $root and $0 are the wrapper's, expanded when it runs
    {
        printf '#!/bin/sh\n'
        printf '# Generated by tools/sid-systemd.sh: %s from Debian %s, run through its own loader.\n' "$tool" "$suite"
        printf 'root=$(dirname "$(dirname "$(readlink -f "$0")")")/root\n'
        printf 'exec "$root/usr/lib/%s/%s" --inhibit-cache --argv0 %s \\\n' "$triplet" "$loader" "$tool"
        printf '    --library-path "%s" \\\n' "$(library_path '$root')"
        printf '    "$root/usr/bin/%s" "$@"\n' "$tool"
    } >"$work/bin/$tool"
    chmod 0755 "$work/bin/$tool"
done

for tool in "${TOOLS[@]}"; do
    v=$("$work/bin/$tool" --version | head -n1) || die "$tool does not run: $v"
    major=$(sed -n 's/^systemd \([0-9][0-9]*\).*/\1/p' <<<"$v")
    [[ -n $major && $major -ge $min_version ]] || die "$tool reports '$v', need systemd >= $min_version"
    log "$tool: $v"
done

rm -rf "$dest"
mv "$work" "$dest"
trap - EXIT
touch "$dest/.complete"
elapsed=$(($(date +%s%3N) - start))
log "done in $((elapsed / 1000)).$(printf '%03d' $((elapsed % 1000))) s"
printf '%s\n' "$dest/bin"
