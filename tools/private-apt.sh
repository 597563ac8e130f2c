#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# A private apt configuration for fetching packages of another Debian suite
# (sid, trixie-backports, ...) without touching the host's apt sources,
# package lists, cache or dpkg database.  Nothing is installed on the host:
# callers `apt-get download` .debs and `dpkg -x` them where they like.
#
# The mirror is never hard-coded: it is taken at run time from the host's own
# apt configuration (deb822 debian.sources `URIs:` line, else the first
# one-line `deb` entry of sources.list), or from $LUOD_DEBIAN_MIRROR.
#
# Use as a library:
#     . tools/private-apt.sh
#     papt_init "$dir" sid            # or: papt_init "$dir" trixie-backports main
#     papt_update "$dir"              # apt-get update, with the keyring fallback
#     papt_get "$dir" download systemd
#     papt_cache "$dir" policy systemd
# or as a command:
#     tools/private-apt.sh DIR SUITE [--components "main"] update|get ARGS|cache ARGS|mirror
#
# Layout of DIR:  etc/sources.list  etc/preferences.d/  state/  cache/  keyring/
#
# Keyring: the suite is verified against the host's
# /usr/share/keyrings/debian-archive-keyring.gpg (Signed-By).  Debian's
# archive keys are announced and put into the debian-archive-keyring package
# of the supported releases well before they are used (Debian ftp-master's
# "Archive Signing Keys" page, keys.html; apt-secure(8)).  So when the host's
# keyring is too old to verify the target suite (NO_PUBKEY), the documented
# remedy is a newer debian-archive-keyring from a suite the host CAN verify
# (the host's own -updates suite, then stable-updates, then stable).  We fetch
# that package through a second private apt configuration, i.e. with the full
# apt chain of trust (signed Release -> Packages hash -> .deb hash), unpack it
# into DIR/keyring/ and use its keyring as Signed-By for the target suite.
# The host's keyring package is not changed.  No key is ever taken unverified
# (no [trusted=yes], no --allow-unauthenticated).

set -o pipefail

PAPT_HOST_KEYRING=${PAPT_HOST_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}

papt_log() { printf 'private-apt: %s\n' "$*" >&2; }

# The Debian mirror URI the host uses (no trailing slash).
papt_mirror() {
    if [[ -n ${LUOD_DEBIAN_MIRROR:-} ]]; then
        printf '%s\n' "${LUOD_DEBIAN_MIRROR%/}"
        return 0
    fi
    local f uri=""
    # deb822: the first stanza whose Suites are not only *-security.
    for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list.d/*.sources; do
        [[ -r $f ]] || continue
        uri=$(awk '
            function flush() {
                if (uris != "" && suites != "" && suites !~ /^([^ ]*-security ?)+$/ && out == "")
                    out = uris
                uris = ""; suites = ""
            }
            /^[[:space:]]*$/ { flush(); next }
            /^[[:space:]]*#/ { next }
            tolower($1) == "uris:"   { uris = $2 }
            tolower($1) == "suites:" { $1 = ""; sub(/^ /, ""); suites = $0 }
            END { flush(); if (out != "") print out }' "$f")
        [[ -n $uri ]] && break
    done
    if [[ -z $uri ]]; then
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [[ -r $f ]] || continue
            uri=$(awk '
                $1 == "deb" {
                    i = 2
                    if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                    if ($(i + 1) !~ /-security$/) { print $i; exit }
                }' "$f")
            [[ -n $uri ]] && break
        done
    fi
    if [[ -z $uri ]]; then
        papt_log "cannot find a Debian mirror in the host's apt sources; set LUOD_DEBIAN_MIRROR"
        return 1
    fi
    printf '%s\n' "${uri%/}"
}

# The apt options that make apt-get/apt-cache use DIR only.  The host's
# apt.conf.d is still read (proxy, Check-Valid-Until, ... stay as the host
# has them); its sources, lists, cache, preferences and dpkg status are not.
papt_opts() {
    local dir=$1
    PAPT_OPTS=(
        -o "Dir::Etc::sourcelist=$dir/etc/sources.list"
        -o "Dir::Etc::sourceparts=-"
        -o "Dir::Etc::preferences=$dir/etc/preferences"
        -o "Dir::Etc::preferencesparts=$dir/etc/preferences.d"
        -o "Dir::State=$dir/state"
        -o "Dir::State::status=$dir/state/status"
        -o "Dir::Cache=$dir/cache"
        -o "APT::Get::List-Cleanup=0"
    )
}

# papt_init DIR SUITE [COMPONENTS] [KEYRING]
papt_init() {
    local dir=$1 suite=$2 components=${3:-main} keyring=${4:-} mirror
    if [[ -z $keyring ]]; then
        keyring=$PAPT_HOST_KEYRING
        # A keyring bootstrapped earlier for this DIR (see papt_update) wins.
        [[ -s $dir/keyring/root/usr/share/keyrings/debian-archive-keyring.gpg ]] &&
            keyring=$dir/keyring/root/usr/share/keyrings/debian-archive-keyring.gpg
    fi
    mirror=$(papt_mirror) || return 1
    mkdir -p "$dir/etc/preferences.d" "$dir/state/lists/partial" \
        "$dir/cache/archives/partial" || return 1
    : >"$dir/state/status"
    printf 'deb [signed-by=%s] %s %s %s\n' "$keyring" "$mirror" "$suite" "$components" \
        >"$dir/etc/sources.list.new" || return 1
    mv -f "$dir/etc/sources.list.new" "$dir/etc/sources.list"
    printf '%s\n' "$suite" >"$dir/etc/suite"
    printf '%s\n' "$components" >"$dir/etc/components"
    # _apt cannot write into root-only cache folders; downloading as root is fine here.
    chmod 0755 "$dir" "$dir/cache" "$dir/cache/archives" "$dir/cache/archives/partial" \
        "$dir/state" "$dir/state/lists" "$dir/state/lists/partial" 2>/dev/null || true
}

papt_get() {
    local dir=$1
    shift
    papt_opts "$dir"
    apt-get -q "${PAPT_OPTS[@]}" -o APT::Sandbox::User=root "$@"
}

papt_cache() {
    local dir=$1
    shift
    papt_opts "$dir"
    apt-cache "${PAPT_OPTS[@]}" "$@"
}

# The candidate version of PACKAGE in DIR's suite (empty if none).
papt_candidate() {
    papt_cache "$1" policy "$2" 2>/dev/null | awk '$1 == "Candidate:" && $2 != "(none)" { print $2 }'
}

# Host's codename (bookworm, ...), for its -updates suite.
papt_host_codename() {
    (. /etc/os-release 2>/dev/null && printf '%s\n' "${VERSION_CODENAME:-}")
}

# Fetch a newer debian-archive-keyring through suites the host keyring can
# verify; unpack it into DIR/keyring and print the keyring path.
papt_bootstrap_keyring() {
    local dir=$1 codename suite best="" best_suite="" v kdir debs
    codename=$(papt_host_codename)
    for suite in ${codename:+$codename-updates} stable-updates stable; do
        kdir="$dir/keyring-src/$suite"
        papt_init "$kdir" "$suite" main "$PAPT_HOST_KEYRING" || continue
        if ! papt_get "$kdir" update >"$kdir/update.log" 2>&1 || ! papt_update_ok "$kdir/update.log"; then
            papt_log "keyring bootstrap: $suite cannot be verified with the host keyring either"
            continue
        fi
        v=$(papt_candidate "$kdir" debian-archive-keyring)
        [[ -n $v ]] || continue
        if [[ -z $best ]] || dpkg --compare-versions "$v" gt "$best"; then
            best=$v
            best_suite=$suite
        fi
    done
    if [[ -z $best ]]; then
        papt_log "no verifiable suite offers debian-archive-keyring"
        return 1
    fi
    papt_log "keyring bootstrap: debian-archive-keyring $best from $best_suite (verified by the host keyring)"
    kdir="$dir/keyring-src/$best_suite"
    rm -rf "$dir/keyring"
    mkdir -p "$dir/keyring"
    (cd "$kdir/cache/archives" && papt_get "$kdir" download "debian-archive-keyring=$best" >&2) || return 1
    debs=("$kdir"/cache/archives/debian-archive-keyring_*.deb)
    dpkg -x "${debs[0]}" "$dir/keyring/root" || return 1
    printf '%s\n' "$dir/keyring/root/usr/share/keyrings/debian-archive-keyring.gpg"
}

# apt-get update exits 0 even when an index could not be fetched or
# verified (it only warns and keeps older lists): read its log instead.
papt_update_ok() {
    ! grep -q '^E: \|^W: Failed to fetch\|^W: Some index files failed\|^W: GPG error\|NO_PUBKEY\|EXPKEYSIG\|is not signed' "$1"
}

# apt-get update for DIR; if the signature cannot be verified with the host
# keyring, bootstrap a newer keyring (see the header) and retry once.
papt_update() {
    local dir=$1 log="$1/update.log" keyring suite components
    if papt_get "$dir" update >"$log" 2>&1 && papt_update_ok "$log"; then
        return 0
    fi
    if ! grep -q 'NO_PUBKEY\|EXPKEYSIG\|not signed' "$log"; then
        cat "$log" >&2
        papt_log "apt-get update failed (see above)"
        return 1
    fi
    papt_log "the host keyring cannot verify $(cat "$dir/etc/suite"); bootstrapping a newer debian-archive-keyring"
    grep 'NO_PUBKEY\|EXPKEYSIG\|not signed' "$log" >&2
    keyring=$(papt_bootstrap_keyring "$dir") || return 1
    suite=$(cat "$dir/etc/suite")
    components=$(cat "$dir/etc/components")
    papt_init "$dir" "$suite" "$components" "$keyring" || return 1
    if papt_get "$dir" update >"$log" 2>&1 && papt_update_ok "$log"; then
        return 0
    fi
    cat "$log" >&2
    papt_log "apt-get update failed even with the bootstrapped keyring"
    return 1
}

papt_main() {
    if [[ $# -lt 3 ]]; then
        echo "usage: $0 DIR SUITE [--components C] update | get ARGS... | cache ARGS... | mirror" >&2
        return 2
    fi
    local dir=$1 suite=$2 components=main
    shift 2
    if [[ $1 == --components ]]; then
        components=$2
        shift 2
    fi
    case $1 in
    mirror) papt_mirror ;;
    update)
        papt_init "$dir" "$suite" "$components" && papt_update "$dir"
        ;;
    get)
        shift
        papt_get "$dir" "$@"
        ;;
    cache)
        shift
        papt_cache "$dir" "$@"
        ;;
    *)
        echo "unknown command: $1" >&2
        return 2
        ;;
    esac
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    set -eu
    papt_main "$@"
fi
