#!/usr/bin/env bash
# run.sh - set up (venv, Docker engine, test image) and run the agent on :8070, next to the
# mock panel (examples/panel_mock) on :8080 that it reports to and that drives it: open the
# printed panel URL to create, start and watch servers in the browser.
#
# The config is ./config.json (or $LIGHTD_CONFIG), created on first run with a random
# master token; state goes to ./storage next to it. While its `remote` section is still
# the default (disabled, https://panel.example/api), it is pointed at the mock panel with a
# fresh token and report_power_state on (the panel shows runtime states); every other key
# of the file is kept. The panel drives the agent with its master token (given in the
# environment, never on the command line; the browser only ever gets temporary tokens). A config whose remote.url points
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
    remote = {"enabled": True, "url": url, "token": new_token(), "report_power_state": True}
    write_config(path, raw, {"remote": remote})
    print(f"run.sh: remote sync in {path} now reports to the mock panel", file=sys.stderr)
elif str(remote.get("url", "")).rstrip("/") == url and "report_power_state" not in remote:
    remote = {**remote, "report_power_state": True}  # an older run.sh's config
    write_config(path, raw, {"remote": remote})
if str(remote.get("url", "")).rstrip("/") == url and remote.get("token"):
    print(remote["token"])
PY
)"
    if [ -n "$panel_token" ]; then
        # The URL the panel (and the browser: console, uploads) reaches the agent at.
        agent_url="$(.venv/bin/python - "$config" <<'PY'
import json
import sys
from pathlib import Path

server = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8")).get("server") or {}
host = str(server.get("host") or "127.0.0.1")
host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
scheme = "https" if server.get("tls") else "http"
print(f"{scheme}://{'[' + host + ']' if ':' in host else host}:{int(server.get('port') or 8070)}")
PY
)"
        PANEL_MOCK_TOKEN="local-node=$panel_token" \
            PANEL_AGENT_TOKEN="$(.venv/bin/lightd --config "$config" --token what | cut -d' ' -f3)" \
            .venv/bin/python -m examples.panel_mock --port "${PANEL_PORT:-8080}" \
            --agent "local-node=$agent_url" &
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
        printf '\nMock panel:   %s/   (create and run servers in the browser: %s/servers/new)\n' \
            "$panel_url" "$panel_url" >&2
    else
        printf '\nrun.sh: remote.url in %s is not %s; not starting the mock panel\n' \
            "$config" "$panel_url" >&2
    fi
fi
printf 'Lightd agent: %s   (config: %s)\n' "${agent_url:-http://127.0.0.1:8070}" "$config" >&2
printf 'Try:  curl -H "Accept: Application/vnd.pkglatv1+json" -H "Authorization: Bearer %s" http://127.0.0.1:8070/system/info\n\n' \
    "$(.venv/bin/lightd --config "$config" --token what | cut -d' ' -f3)" >&2
.venv/bin/lightd --config "$config" "$@"
