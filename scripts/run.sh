#!/usr/bin/env bash
# run.sh - set up (venv, Docker engine, test image) and run the agent on :8070.
#
# The config is ./config.json (or $LIGHTD_CONFIG), created on first run with a random
# master token; state goes to ./storage next to it. Extra arguments go to `lightd`,
# e.g. `bash scripts/run.sh --dev`. Stop with Ctrl-C.
set -euo pipefail

cd "$(dirname "$0")/.."
eval "$(bash scripts/bootstrap.sh)"
export DOCKER_HOST
config="${LIGHTD_CONFIG:-$PWD/config.json}"
.venv/bin/lightd --config "$config" --token what >/dev/null  # creates it on first run
printf '\nLightd agent: http://127.0.0.1:8070   (config: %s)\n' "$config" >&2
printf 'Try:  curl -H "Accept: Application/vnd.pkglatv1+json" -H "Authorization: Bearer %s" http://127.0.0.1:8070/system/info\n\n' \
    "$(.venv/bin/lightd --config "$config" --token what | cut -d' ' -f3)" >&2
exec .venv/bin/lightd --config "$config" "$@"
