#!/usr/bin/env bash
# run.sh - set up (venv, Docker engine, test image) and run the agent on :8070, next to the
# mock panel (examples/panel_mock) on :8080 that it reports to.
#
# The config is ./config.json (or $LIGHTD_CONFIG), created on first run with a random
# master token; state goes to ./storage next to it. While its `remote` section is still
# the default (disabled, https://panel.example/api), it is pointed at the mock panel with a
# fresh token; every other key of the file is kept. A config whose remote.url points
# elsewhere is left alone and no panel is started. The panel's page is
# http://127.0.0.1:8080/ (port: $PANEL_PORT); LIGHTD_NO_PANEL=1 runs the agent alone.
# Extra arguments go to `lightd`, e.g. `bash scripts/run.sh --dev`. Stop with Ctrl-C: the
# panel stops with the agent.
set -euo pipefail

cd "$(dirname "$0")/.."
eval "$(bash scripts/bootstrap.sh)"
export DOCKER_HOST
config="${LIGHTD_CONFIG:-$PWD/config.json}"
# First run: create the config (a random master token). Only serving and --token reset/set
# create a missing config; every other command fails on one.
[ -e "$config" ] || .venv/bin/lightd --config "$config" --token reset >/dev/null
# Every `lightd` command (e.g. `lightd --servers` in another shell, without DOCKER_HOST)
# must find the engine this agent uses: record the private engine's socket in the config
# while docker.socket_path is still the default.
.venv/bin/python - "$config" "$DOCKER_HOST" <<'PY'
import json
import sys
from pathlib import Path

from lightd.config import DockerConfig, write_config

path, host = Path(sys.argv[1]), sys.argv[2]
raw = json.loads(path.read_text(encoding="utf-8"))
docker = raw.get("docker") if isinstance(raw.get("docker"), dict) else {}
default = DockerConfig().socket_path
socket = host.removeprefix("unix://")
if host.startswith("unix://") and docker.get("socket_path", default) == default != socket:
    write_config(path, raw, {"docker": {"socket_path": socket}})
    print(f"run.sh: docker.socket_path in {path} is now {socket}", file=sys.stderr)
PY

panel_url="http://127.0.0.1:${PANEL_PORT:-8080}"
if [ -z "${LIGHTD_NO_PANEL:-}" ]; then
    # Prints the token the panel must accept, when remote.url is the local panel.
    panel_token="$(.venv/bin/python - "$config" "$panel_url" <<'PY'
import json
import sys
from pathlib import Path

from lightd.config import new_token, write_config

path, url = Path(sys.argv[1]), sys.argv[2]
raw = json.loads(path.read_text(encoding="utf-8"))
remote = raw.get("remote") if isinstance(raw.get("remote"), dict) else {}
if not remote.get("enabled") and remote.get("url", "https://panel.example/api") in (
    "https://panel.example/api",
    "",
):
    remote = {"enabled": True, "url": url, "token": new_token()}
    write_config(path, raw, {"remote": remote})
    print(f"run.sh: remote sync in {path} now reports to the mock panel", file=sys.stderr)
if str(remote.get("url", "")).rstrip("/") == url and remote.get("token"):
    print(remote["token"])
PY
)"
    if [ -n "$panel_token" ]; then
        PANEL_MOCK_TOKEN="local-node=$panel_token" \
            .venv/bin/python -m examples.panel_mock --port "${PANEL_PORT:-8080}" &
        panel_pid=$!
        trap 'kill "$panel_pid" 2>/dev/null || true; wait "$panel_pid" 2>/dev/null || true' EXIT
        if ! .venv/bin/python - "$panel_url" "$panel_pid" <<'PY'
import os
import sys
import time
import urllib.request

url, pid = sys.argv[1], int(sys.argv[2])
for _ in range(100):
    try:
        urllib.request.urlopen(url + "/api/state", timeout=1).close()
        sys.exit(0)
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
sys.exit(1)
PY
        then
            echo "run.sh: the mock panel did not start on $panel_url" >&2
            exit 1
        fi
        printf '\nMock panel:   %s/   (live page; the agent reports to it)\n' "$panel_url" >&2
    else
        printf '\nrun.sh: remote.url in %s is not %s; not starting the mock panel\n' \
            "$config" "$panel_url" >&2
    fi
fi
printf 'Lightd agent: http://127.0.0.1:8070   (config: %s)\n' "$config" >&2
printf 'Try:  curl -H "Accept: Application/vnd.pkglatv1+json" -H "Authorization: Bearer %s" http://127.0.0.1:8070/system/info\n\n' \
    "$(.venv/bin/lightd --config "$config" --token what | cut -d' ' -f3)" >&2
.venv/bin/lightd --config "$config" "$@"
