#!/usr/bin/env bash
# test.sh - set up (venv, Docker engine, test image, chromium) and run the checks: ruff, then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k tokens -x`.
set -euo pipefail

cd "$(dirname "$0")/.."
eval "$(bash scripts/bootstrap.sh)"
export DOCKER_HOST
# The mock panel's page is checked in headless chromium; without it that test fails and says so.
bash scripts/chromium.sh || echo "test.sh: chromium could not be installed (see above)" >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/pytest "$@"
