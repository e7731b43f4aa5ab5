#!/usr/bin/env bash
# chromium.sh - Debian's chromium, the headless browser that checks the mock panel's page
# (tests/test_panel_mock_browser.py). Installs it only when missing: idempotent, and
# instant once it is there. Needs root and a Debian mirror, like scripts/bootstrap.sh.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
printf "chromium: installing Debian's chromium for the panel page test\n" >&2
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends chromium; } >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    printf 'chromium: installation failed\n' >&2
    exit 1
fi
command -v chromium >/dev/null
