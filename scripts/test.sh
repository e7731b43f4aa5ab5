#!/usr/bin/env bash
# test.sh - set up (venv, Docker engine, test image) and run the checks: ruff, then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k tokens -x`.
set -euo pipefail

cd "$(dirname "$0")/.."
eval "$(bash scripts/bootstrap.sh)"
export DOCKER_HOST
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/pytest "$@"
