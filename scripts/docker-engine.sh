#!/usr/bin/env bash
# docker-engine.sh - make sure a Docker engine and the lightd test image exist.
#
# Usage:
#   eval "$(bash scripts/docker-engine.sh)"   # ensure engine + image, export DOCKER_HOST
#   bash scripts/docker-engine.sh --stop      # stop the private dockerd started by this script
#   bash scripts/docker-engine.sh --help
#
# Contract: diagnostics go to stderr; on success the ONLY line written to stdout
# is `export DOCKER_HOST=...`. Exits non-zero with a message on any failure.
# Nothing is ever pulled from an image registry.
#
# Engine selection, first match wins:
#   1. $DOCKER_HOST, if set and `docker info` answers through it;
#   2. /var/run/docker.sock, if it exists and answers;
#   3. a private dockerd owned by this script (installed via apt if missing):
#        data root, config, log : $LIGHTD_DOCKER_DIR (default /var/lib/lightd-docker)
#        exec root, pidfile, sock: $LIGHTD_DOCKER_RUN_DIR (default /run/lightd-docker)
#
# Environment:
#   LIGHTD_DOCKER_DIR       state dir of the private engine   [/var/lib/lightd-docker]
#   LIGHTD_DOCKER_RUN_DIR   runtime dir (keep it short: unix socket paths
#                           must stay under 108 bytes)        [/run/lightd-docker]
#   LIGHTD_TEST_IMAGE       test image to ensure              [lightd/busybox:latest]
#   LIGHTD_DOCKERD_ARGS     extra arguments for the private dockerd (space separated)
#   LIGHTD_DOCKER_TIMEOUT   seconds to wait for the private dockerd [60]
set -euo pipefail

STATE_DIR="${LIGHTD_DOCKER_DIR:-/var/lib/lightd-docker}"
RUN_DIR="${LIGHTD_DOCKER_RUN_DIR:-/run/lightd-docker}"
IMAGE="${LIGHTD_TEST_IMAGE:-lightd/busybox:latest}"
START_TIMEOUT="${LIGHTD_DOCKER_TIMEOUT:-60}"

DATA_ROOT="$STATE_DIR/data"
CONFIG_FILE="$STATE_DIR/daemon.json"
LOG_FILE="$STATE_DIR/dockerd.log"
APT_LOG="$STATE_DIR/apt.log"
LOCK_FILE="$STATE_DIR/lock"
EXEC_ROOT="$RUN_DIR/exec"
PIDFILE="$RUN_DIR/dockerd.pid"
SOCK="$RUN_DIR/docker.sock"
SYSTEM_SOCK="/var/run/docker.sock"

PROG="docker-engine.sh"

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage() {
    cat >&2 <<EOF
Usage: $PROG [--stop | --help]

Without arguments: ensure a Docker engine answers and that the test image
'$IMAGE' exists, then print exactly one line on stdout:
    export DOCKER_HOST=unix:///path/to/docker.sock
so that callers can run:  eval "\$(bash scripts/docker-engine.sh)"

Engine selection (first match wins):
  1. \$DOCKER_HOST if set and answering
  2. $SYSTEM_SOCK if it exists and answers
  3. a private dockerd started by this script (apt-get installs docker.io if
     dockerd is missing), with
       data root / config / log: $STATE_DIR
       exec root / pidfile / socket: $RUN_DIR

The test image is built locally from Debian's busybox-static (never pulled).

Options:
  --stop   stop the private dockerd started by this script (via its pidfile)
           and wait for it to exit; do nothing if it is not running
  --help   show this help

Environment: LIGHTD_DOCKER_DIR, LIGHTD_DOCKER_RUN_DIR, LIGHTD_TEST_IMAGE,
             LIGHTD_DOCKERD_ARGS, LIGHTD_DOCKER_TIMEOUT
EOF
}

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

# engine_answers HOST: true if `docker info` answers through HOST; sets
# ENGINE_VERSION to the server version.
ENGINE_VERSION=""
engine_answers() {
    local v
    v="$(DOCKER_HOST="$1" timeout 10 docker info --format '{{.ServerVersion}}' 2>/dev/null)" || return 1
    [ -n "$v" ] || return 1
    ENGINE_VERSION="$v"
}

# alive PID: true if PID exists and is not a zombie. (Orphans are re-parented
# to pid 1, which may reap them late; kill -0 succeeds on zombies.)
alive() {
    local st
    st="$(sed -n 's/^.*) \([A-Za-z]\).*$/\1/p' "/proc/$1/stat" 2>/dev/null || true)"
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

need_root() {
    [ "$(id -u)" -eq 0 ] || die "$1 requires root (run as root or via sudo)"
}

# private_pid: print the pid of the running private dockerd, if any.
# A pidfile naming a dead process, or a process that is not our dockerd
# (pid reuse), is stale and gets removed.
private_pid() {
    local pid cmdline
    [ -f "$PIDFILE" ] || return 1
    pid="$(tr -dc '0-9' <"$PIDFILE" 2>/dev/null || true)"
    if [ -n "$pid" ] && alive "$pid"; then
        cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
        case "$cmdline" in
            *dockerd*"$EXEC_ROOT"*)
                printf '%s\n' "$pid"
                return 0
                ;;
        esac
    fi
    log "removing stale pidfile $PIDFILE (pid '${pid:-?}' is not a running private dockerd)"
    rm -f "$PIDFILE"
    return 1
}

apt_install() {
    need_root "installing $*"
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install $* manually"
    mkdir -p "$STATE_DIR"
    log "installing $* with apt-get (log: $APT_LOG)"
    {
        echo "=== $(date -u '+%Y-%m-%dT%H:%M:%SZ') apt-get install $*"
    } >>"$APT_LOG"
    if ! apt-get -o DPkg::Lock::Timeout=300 update >>"$APT_LOG" 2>&1 ||
        ! DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 \
            install -y --no-install-recommends "$@" >>"$APT_LOG" 2>&1; then
        log "apt-get failed; last lines of $APT_LOG:"
        tail -n 40 "$APT_LOG" >&2 || true
        die "could not install $*"
    fi
}

dump_dockerd_log() {
    if [ -f "$LOG_FILE" ]; then
        log "last lines of $LOG_FILE:"
        tail -n 40 "$LOG_FILE" >&2 || true
    fi
}

# --------------------------------------------------------------------------
# --stop
# --------------------------------------------------------------------------
stop_private() {
    local pid deadline
    if ! pid="$(private_pid)"; then
        log "private dockerd is not running (no live pid in $PIDFILE); nothing to do"
        return 0
    fi
    need_root "stopping the private dockerd"
    log "stopping private dockerd (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 60))
    while alive "$pid"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "dockerd (pid $pid) still running after 60 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.1
    done
    rm -f "$PIDFILE"
    log "private dockerd stopped"
}

# --------------------------------------------------------------------------
# private engine
# --------------------------------------------------------------------------

# If dockerd died hard, its managed containerd may linger as a zombie for a
# while; dockerd 20.10 then believes "containerd is still running", waits for
# its socket and gives up after 15 s. Drop such a stale containerd pidfile (a
# live containerd is left alone: dockerd reconnects to it).
clean_stale_containerd() {
    local cpf="$EXEC_ROOT/containerd/containerd.pid" cpid
    [ -f "$cpf" ] || return 0
    cpid="$(tr -dc '0-9' <"$cpf" 2>/dev/null || true)"
    if [ -n "$cpid" ] && alive "$cpid" &&
        [ "$(cat "/proc/$cpid/comm" 2>/dev/null || true)" = containerd ]; then
        return 0
    fi
    log "removing stale containerd pidfile $cpf (pid '${cpid:-?}')"
    rm -f "$cpf"
}

start_private() {
    local pid extra=() deadline
    if [ "$(id -u)" -ne 0 ] && [ -S "$SOCK" ]; then
        die "$SOCK exists but does not answer for $(id -un): no permission (join group 'docker' or run as root) or the engine is down (run as root to start it)"
    fi
    need_root "starting a private dockerd"

    if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
        apt_install docker.io
        hash -r
        command -v dockerd >/dev/null 2>&1 || die "dockerd still missing after installing docker.io"
        # On a systemd host the package may have started the system engine.
        if [ -S "$SYSTEM_SOCK" ] && engine_answers "unix://$SYSTEM_SOCK"; then
            SELECTED="unix://$SYSTEM_SOCK"
            log "using system engine started by the docker.io package ($SELECTED)"
            return 0
        fi
    fi

    mkdir -p "$STATE_DIR" "$DATA_ROOT" "$RUN_DIR" "$EXEC_ROOT"
    chmod 0711 "$STATE_DIR" "$RUN_DIR"

    if pid="$(private_pid)"; then
        log "reusing private dockerd (pid $pid), waiting for $SOCK"
    else
        # Our own (empty) config file: never pick up /etc/docker/daemon.json,
        # whose settings (hosts, data-root...) could clash with our flags.
        [ -f "$CONFIG_FILE" ] || printf '{}\n' >"$CONFIG_FILE"
        if [ -n "${LIGHTD_DOCKERD_ARGS:-}" ]; then
            read -r -a extra <<<"$LIGHTD_DOCKERD_ARGS"
        fi
        # Keep the previous log around, start the new one fresh.
        [ -f "$LOG_FILE" ] && mv -f "$LOG_FILE" "$LOG_FILE.1"
        rm -f "$SOCK"
        clean_stale_containerd
        log "starting private dockerd (socket $SOCK, data $DATA_ROOT, log $LOG_FILE)"
        # setsid+nohup: detached from our session so it outlives this script.
        # All of stdin/stdout/stderr and the lock fd are redirected or closed so
        # that `$(...)` callers and other invocations are never held up by it.
        # Separate containerd namespaces keep it apart from a system dockerd
        # that might share a system containerd.
        setsid nohup dockerd \
            --config-file "$CONFIG_FILE" \
            --data-root "$DATA_ROOT" \
            --exec-root "$EXEC_ROOT" \
            --pidfile "$PIDFILE" \
            --host "unix://$SOCK" \
            --containerd-namespace lightd \
            --containerd-plugins-namespace lightd-plugins \
            "${extra[@]}" \
            </dev/null >>"$LOG_FILE" 2>&1 9>&- &
        pid=$!
    fi

    deadline=$((SECONDS + START_TIMEOUT))
    while :; do
        if [ -S "$SOCK" ] && engine_answers "unix://$SOCK"; then
            break
        fi
        if ! alive "$pid"; then
            dump_dockerd_log
            die "private dockerd (pid $pid) exited before answering on $SOCK"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            dump_dockerd_log
            die "private dockerd did not answer on $SOCK within ${START_TIMEOUT}s"
        fi
        sleep 0.2
    done
    SELECTED="unix://$SOCK"
    log "private dockerd is up ($SELECTED)"
}

# --------------------------------------------------------------------------
# test image
# --------------------------------------------------------------------------
busybox_is_static() {
    [ -x /bin/busybox ] || return 1
    # Static binaries: "not a dynamic executable" / "statically linked".
    # (ldd exits 1 for static binaries: capture first, pipefail is on.)
    local out
    out="$(LC_ALL=C ldd /bin/busybox 2>&1 || true)"
    case "$out" in
        *"not a dynamic executable"* | *"statically linked"*) return 0 ;;
    esac
    return 1
}

build_image() {
    local tmp rootfs applet out
    if ! busybox_is_static; then
        apt_install busybox-static
        busybox_is_static || die "/bin/busybox is not a static binary even after installing busybox-static"
    fi

    tmp="$(mktemp -d "${TMPDIR:-/tmp}/lightd-busybox.XXXXXX")"
    # shellcheck disable=SC2064  # expand $tmp now
    trap "rm -rf '$tmp'" EXIT
    rootfs="$tmp/rootfs"
    log "building $IMAGE from /bin/busybox ($(/bin/busybox 2>&1 | head -n 1 || true))"

    mkdir -p "$rootfs"/{bin,etc,proc,sys,dev,root,home/container,app/data,tmp,usr}
    chmod 1777 "$rootfs/tmp"
    chmod 0700 "$rootfs/root"
    cp /bin/busybox "$rootfs/bin/busybox"
    chmod 0755 "$rootfs/bin/busybox"
    while IFS= read -r applet; do
        case "$applet" in "" | busybox) continue ;; esac
        ln -s busybox "$rootfs/bin/$applet"
    done < <("$rootfs/bin/busybox" --list)
    [ -e "$rootfs/bin/sh" ] || die "busybox provides no 'sh' applet"
    # Conventional paths (#!/usr/bin/env sh, /sbin/...) resolve to /bin too.
    ln -s bin "$rootfs/sbin"
    ln -s ../bin "$rootfs/usr/bin"
    ln -s ../bin "$rootfs/usr/sbin"
    cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
    cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
EOF

    tar --numeric-owner --owner=0 --group=0 -C "$rootfs" -c . |
        docker import \
            -c 'ENV PATH=/bin' \
            -c 'WORKDIR /home/container' \
            -c 'CMD ["/bin/sh"]' \
            -m "lightd test image built from Debian busybox-static" \
            - "$IMAGE" >/dev/null ||
        die "docker import of $IMAGE failed"
    rm -rf "$tmp"
    trap - EXIT

    log "verifying $IMAGE"
    if ! out="$(timeout 60 docker run --rm "$IMAGE" sh -c 'echo ok && ls /home/container' 2>&1)" ||
        [ "$(printf '%s\n' "$out" | head -n 1)" != ok ]; then
        printf '%s\n' "$out" >&2
        docker rmi -f "$IMAGE" >/dev/null 2>&1 || true
        die "test container from $IMAGE did not run correctly (image removed)"
    fi
    log "built and verified $IMAGE"
}

# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------
case "${1:-}" in
    -h | --help)
        usage
        exit 0
        ;;
    --stop)
        [ $# -eq 1 ] || { usage; exit 2; }
        stop_private
        exit 0
        ;;
    "") ;;
    *)
        log "unknown argument: $1"
        usage
        exit 2
        ;;
esac

command -v timeout >/dev/null 2>&1 || die "'timeout' (coreutils) is required"

SELECTED=""
if [ -n "${DOCKER_HOST:-}" ]; then
    if command -v docker >/dev/null 2>&1 && engine_answers "$DOCKER_HOST"; then
        SELECTED="$DOCKER_HOST"
    else
        log "DOCKER_HOST=$DOCKER_HOST does not answer; looking for another engine"
    fi
fi
if [ -z "$SELECTED" ] && [ -S "$SYSTEM_SOCK" ] && command -v docker >/dev/null 2>&1 &&
    engine_answers "unix://$SYSTEM_SOCK"; then
    SELECTED="unix://$SYSTEM_SOCK"
fi
# Fast path: the private engine is already up.
if [ -z "$SELECTED" ] && [ -S "$SOCK" ] && command -v docker >/dev/null 2>&1 &&
    engine_answers "unix://$SOCK"; then
    SELECTED="unix://$SOCK"
fi

if [ -z "$SELECTED" ] || ! DOCKER_HOST="$SELECTED" docker image inspect "$IMAGE" >/dev/null 2>&1; then
    # Slow path: serialise concurrent invocations (test workers, CI jobs).
    if [ "$(id -u)" -eq 0 ]; then
        mkdir -p "$STATE_DIR"
        exec 9>>"$LOCK_FILE"
        flock -w 600 9 || die "timed out waiting for lock $LOCK_FILE"
        # Another invocation may have done the work while we waited.
        if [ -z "$SELECTED" ] && [ -S "$SOCK" ] && engine_answers "unix://$SOCK"; then
            SELECTED="unix://$SOCK"
        fi
    fi
    if [ -z "$SELECTED" ]; then
        start_private
    fi
    export DOCKER_HOST="$SELECTED"
    if ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
        build_image
    fi
fi

export DOCKER_HOST="$SELECTED"
log "engine: $DOCKER_HOST (server ${ENGINE_VERSION:-?}), image: $IMAGE"
printf 'export DOCKER_HOST=%q\n' "$DOCKER_HOST"
