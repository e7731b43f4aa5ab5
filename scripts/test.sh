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
# The SFTP tests drive OpenSSH's sftp client (and ssh-keyscan); bench.sftp also runs sshd.
if ! command -v sftp >/dev/null 2>&1 || ! [ -x /usr/sbin/sshd ]; then
    { apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-client openssh-server; } >&2 ||
        echo "test.sh: openssh-client/openssh-server could not be installed" >&2
fi
# The example plugin is installed like a third-party one (editable; again when its pyproject
# changes), so its own tests, in pytest's testpaths, run against an agent that finds it
# through its entry point. (tests/test_plugin_kit.py installs the template's output itself.)
motd="examples/plugins/lightd-motd"
want="$(sha256sum "$motd/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat .venv/.lightd-motd 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e "$motd" >&2
    echo "$want" > .venv/.lightd-motd
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Types: mypy strict over lightd and the mock panel ([tool.mypy]); on errors it lists them per file.
.venv/bin/python scripts/typecheck.py
exec .venv/bin/pytest "$@"
