#!/usr/bin/env bash
# vendor-swagger-ui.sh - copy Swagger UI (npm's swagger-ui-dist) into the package, for the
# agent's /docs page. Nodes are often offline, so the page loads nothing from a CDN: its
# assets ship in the wheel (agent/api/static/swagger-ui/, package data of lightd.api).
#
# Usage:
#   bash scripts/vendor-swagger-ui.sh            # fetch the pinned version, check, copy
#   VERSION=5.x.y SHA256=... bash scripts/vendor-swagger-ui.sh   # upgrade (then pin below)
#
# Fetches the tarball with `npm pack` (the npm registry), refuses it unless its sha256 is
# the pinned one, and copies only what /docs serves plus the licences: the bundle, its
# stylesheet, a favicon, LICENSE, NOTICE and the bundle's third-party licence list. The
# VERSION file records the version and the tarball's sha256.
set -euo pipefail

VERSION="${VERSION:-5.35.0}"
SHA256="${SHA256:-1b8e891893404ea4c3558b6a87e2a3e494e7eedba41168c2ece5800a391a6ea6}"
FILES=(swagger-ui-bundle.js swagger-ui-bundle.js.LICENSE.txt swagger-ui.css
       favicon-32x32.png LICENSE NOTICE)

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/agent/api/static/swagger-ui"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

command -v npm >/dev/null || { printf 'vendor-swagger-ui: npm is needed\n' >&2; exit 1; }
(cd "$work" && npm pack --silent "swagger-ui-dist@$VERSION" >/dev/null)
tarball="$work/swagger-ui-dist-$VERSION.tgz"
actual="$(sha256sum "$tarball" | cut -d' ' -f1)"
if [[ "$actual" != "$SHA256" ]]; then
    printf 'vendor-swagger-ui: sha256 of swagger-ui-dist %s is %s, expected %s\n' \
        "$VERSION" "$actual" "$SHA256" >&2
    exit 1
fi
tar -xzf "$tarball" -C "$work"
rm -rf "$dest"
mkdir -p "$dest"
for name in "${FILES[@]}"; do
    cp "$work/package/$name" "$dest/$name"
done
printf 'swagger-ui-dist %s\nsha256 %s\n' "$VERSION" "$SHA256" >"$dest/VERSION"
printf 'vendor-swagger-ui: swagger-ui-dist %s in %s\n' "$VERSION" "${dest#"$root"/}" >&2
