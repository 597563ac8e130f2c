#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# tools/build-deb.sh OUTDIR — build luod's Debian package (make deb) and
# check it with lintian; the .deb's path is the last stdout line.
#
# Built on the host (Debian bookworm; debhelper, dh-python and lintian from
# its own apt sources, vm/host-deps.sh deb), for Debian unstable: the
# package needs systemd >= 261 and python3-asyncvarlink, which only
# unstable has. It is Architecture: all and pure Python (dh_python3 gives it
# python3:any), so the build suite does not matter to what it contains.
#
# The tree is copied (without .git, the venv and caches) into a staging
# folder with build/docs (make man) as generated/, so the build never writes into the
# work tree. The result is cached in ${LUOD_CACHE:-~/.cache/luod}/deb/<key>/,
# key: sha256 over the staged files, so a second run with nothing changed
# takes a second. lintian must report no error and no warning
# (debian/luod.lintian-overrides says why for each override).
set -euo pipefail

out=${1:?usage: tools/build-deb.sh OUTDIR}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
log() { printf 'build-deb: %s\n' "$*" >&2; }

# The rendered docs (make man); $LUOD_DOCS: elsewhere (tests).
docs=${LUOD_DOCS:-$repo/build/docs}
[[ -s $docs/man/luod.8 ]] || {
	log "$docs is missing: run make man first"
	exit 1
}
version=$(sed -n '1s/^luod (\([^)]*\)).*/\1/p' "$repo/debian/changelog")
py_version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$repo/luod/__init__.py")
[[ $version == "$py_version" ]] || {
	log "debian/changelog says $version, luod/__init__.py $py_version: add a changelog entry"
	exit 1
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
src=$work/luod-$version
mkdir -p "$src"
# What the package is made of: the Python package, the units, debian/ and
# the build metadata; plus the rendered docs.
tar -C "$repo" --exclude=__pycache__ -cf - luod units debian pyproject.toml README.md |
	tar -C "$src" -xf -
cp -a "$docs" "$src/generated"
# $LUOD_DEB_VERSION: another version of the same tree (the systemd tier's
# upgrade scenario), as a changelog entry on top.
if [[ -n ${LUOD_DEB_VERSION:-} ]]; then
	{
		printf 'luod (%s) unstable; urgency=medium\n\n' "$LUOD_DEB_VERSION"
		printf '  * The same tree as %s, built as %s (tools/build-deb.sh).\n\n' "$version" "$LUOD_DEB_VERSION"
		# A second after the entry below: newer, and the same on every run.
		base=$(date -d "$(dpkg-parsechangelog -l "$src/debian/changelog" -S Date)" +%s)
		printf ' -- luod project <luod@luod.invalid>  %s\n\n' "$(LC_ALL=C date -u -R -d "@$((base + 1))")"
		cat "$src/debian/changelog"
	} >"$work/changelog"
	mv "$work/changelog" "$src/debian/changelog"
	version=$LUOD_DEB_VERSION
fi

key=$( (
	cd "$src"
	find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
	cat "$repo/tools/build-deb.sh"
) | sha256sum | cut -c1-12)
cache_root=${LUOD_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/luod}/deb
cache=$cache_root/$key
deb=luod_${version}_all.deb
mkdir -p "$out" "$cache_root"
# One build at a time (the systemd tier's two runs build the same package at
# once): whoever waited finds it cached, never a half-copied one.
exec 9>"$cache_root/.lock"
flock 9
if [[ -s $cache/$deb ]]; then
	log "cached: $cache/$deb"
else
	"$repo/vm/host-deps.sh" deb
	log "building $deb (dpkg-buildpackage, staged in $src)"
	# The system's python3 only: a python3 of pyenv's or a venv's first in
	# PATH would be the one pybuild builds for.
	(cd "$src" && env PATH=/usr/sbin:/usr/bin:/sbin:/bin \
		SOURCE_DATE_EPOCH="$(date -d "$(dpkg-parsechangelog -S Date)" +%s)" \
		dpkg-buildpackage -us -uc -b >"$work/build.log" 2>&1) || {
		tail -40 "$work/build.log" >&2
		exit 1
	}
	log "lintian $deb"
	# --fail-on warning: an unexplained warning fails the build, as an error does.
	env PATH=/usr/sbin:/usr/bin:/sbin:/bin \
		lintian --fail-on error,warning --display-info --info "$work/$deb" >&2
	mkdir -p "$cache"
	cp "$work/$deb" "$work"/luod_*.buildinfo "$work"/luod_*.changes "$cache/"
fi
cp "$cache/$deb" "$out/$deb"
echo "$out/$deb"
