#!/usr/bin/env bash
# bootstrap.sh - everything the agent and its tests need on a fresh Debian machine:
# the Python virtualenv (.venv, the stack pinned by constraints.txt) and a Docker engine
# with the local test image (scripts/docker-engine.sh). Idempotent; fast when all is there.
#
# Usage: eval "$(bash scripts/bootstrap.sh)"   # prints `export DOCKER_HOST=...` on stdout
set -euo pipefail

cd "$(dirname "$0")/.."
log() { printf 'bootstrap: %s\n' "$*" >&2; }

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    log "Python >= 3.11 is required (found: $("$PYTHON" --version 2>&1 || echo none))"
    exit 1
fi

# Reinstall only when the dependency declarations changed since the last install.
stamp=".venv/.lightd-deps"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    if ! "$PYTHON" -m venv .venv >&2; then
        log "python venv is missing; installing Debian's python3-venv"
        apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
        "$PYTHON" -m venv .venv >&2
    fi
    log "installing lightd and its test tools into .venv"
    .venv/bin/python -m pip install -q --disable-pip-version-check \
        -c constraints.txt -e '.[test]' >&2
    echo "$want" > "$stamp"
fi

bash scripts/docker-engine.sh
