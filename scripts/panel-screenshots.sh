#!/usr/bin/env bash
# panel-screenshots.sh - regenerate the mock panel's screenshots in docs/img/ (panel-*.png)
# by running its browser end-to-end test (tests/test_panel_browser_e2e.py) against a real
# agent on the private Docker engine, with headless chromium.
set -euo pipefail

cd "$(dirname "$0")/.."
eval "$(bash scripts/bootstrap.sh)"
export DOCKER_HOST
bash scripts/chromium.sh
LIGHTD_PANEL_SCREENSHOTS=docs/img .venv/bin/pytest tests/test_panel_browser_e2e.py -q -p no:cacheprovider
ls -1 docs/img/panel-*.png
