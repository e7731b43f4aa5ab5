#!/usr/bin/env bash
# test.sh - set up (venv, Docker engine, test image, chromium) and run the checks: ruff, mypy, then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k tokens -x`.
set -euo pipefail

cd "$(dirname "$0")/.."
eval "$(bash scripts/bootstrap.sh)"
export DOCKER_HOST
# The mock panel's page is checked in headless chromium; without it that test fails and says so.
bash scripts/chromium.sh || echo "test.sh: chromium could not be installed (see above)" >&2
# The TLS tests make their certificate with the openssl command line; without it they fail.
if ! command -v openssl >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl; } >&2 ||
        echo "test.sh: openssl could not be installed" >&2
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Types: mypy strict over lightd and the mock panel ([tool.mypy]); on errors it lists them per file.
.venv/bin/python scripts/typecheck.py
exec .venv/bin/pytest "$@"
