#!/bin/bash
# vm/host-deps.sh [build|qemu|deb|all] — install the host packages the VM tier
# needs, from the host's own (Debian bookworm) apt sources, when missing.
#
#   build: what vm/build-kernel.sh needs to fetch and build a kernel
#   qemu:  what tests/vm needs to boot it (qemu-system-x86_64)
#   deb:   what make deb needs (debhelper, dh-python, lintian; bookworm's)
#   all:   all three, plus kexec-tools and busybox-static for the other VM tiers
#
# Nothing is installed when everything is there already (fast no-op). Needs
# root, or password-less sudo. Never touches the host's apt sources: packages
# from newer suites are fetched by vm/build-kernel.sh with a private apt
# configuration and only unpacked, never installed.
set -euo pipefail

what=${1:-all}

missing=()
need() { # need PACKAGE TEST...
	local pkg=$1
	shift
	if ! "$@" >/dev/null 2>&1; then
		missing+=("$pkg")
	fi
}
have() { command -v "$1"; }
header() { test -e "/usr/include/$1"; }
# A package that brings no command of its own (python3-all: a dependency
# package only): asked of dpkg, not of PATH.
installed() { dpkg-query -W -f='${Status}' "$1" | grep -q ' installed$'; }

build_deps() {
	need build-essential have gcc
	need build-essential have make
	need flex have flex
	need bison have bison
	need bc have bc
	need cpio have cpio
	need xz-utils have xz
	need perl have perl
	need libelf-dev header gelf.h
	need libssl-dev header openssl/ssl.h
	need apt have apt-get
	need dpkg have dpkg-deb
	need util-linux have flock
}
qemu_deps() {
	need qemu-system-x86 have qemu-system-x86_64
}
# make deb (tools/build-deb.sh): debhelper, pybuild with hatchling, lintian.
deb_deps() {
	need debhelper have dh
	need dh-python have pybuild
	need pybuild-plugin-pyproject test -e /usr/share/dh-python/dhpython/build/plugin_pyproject.py
	need python3-all installed python3-all
	need python3-hatchling /usr/bin/python3 -c 'import hatchling'
	need lintian have lintian
}

case $what in
build) build_deps ;;
qemu) qemu_deps ;;
deb) deb_deps ;;
all)
	build_deps
	qemu_deps
	deb_deps
	need kexec-tools have kexec
	need busybox-static test -x /bin/busybox
	;;
*)
	echo "usage: $0 [build|qemu|deb|all]" >&2
	exit 2
	;;
esac

if [ ${#missing[@]} -eq 0 ]; then
	exit 0
fi
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)

sudo=()
if [ "$(id -u)" -ne 0 ]; then
	if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
		sudo=(sudo -n)
	else
		echo "host-deps: missing packages: ${missing[*]}; not root and no password-less sudo." >&2
		echo "host-deps: install them with: apt-get install ${missing[*]}" >&2
		exit 1
	fi
fi

echo "host-deps: installing ${missing[*]} (from the host's apt sources)" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q >&2
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
