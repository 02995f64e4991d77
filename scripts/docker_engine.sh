#!/usr/bin/env bash
# A private Docker engine (Debian's docker.io dockerd) for the compose test and for trying the stack by hand,
# apart from any other engine on the host: its own data root, socket and pid file.
#
#   scripts/docker_engine.sh start RUN_DIR [DATA_ROOT]   start dockerd; prints DOCKER_HOST=unix://RUN_DIR/docker.sock
#   scripts/docker_engine.sh stop RUN_DIR                 stop the dockerd started with that RUN_DIR
#
# DATA_ROOT (default /var/lib/sam-trimap-docker) keeps image layers between runs, so a second run builds
# nothing it has built before; RUN_DIR holds only the socket, pid file, exec root and log (a temp dir).
# Needs root (dockerd does).
set -euo pipefail

die() { printf '[docker_engine] ERROR: %s\n' "$*" >&2; exit 1; }

command_="${1:-}"
run_dir="${2:-}"
[ -n "$command_" ] && [ -n "$run_dir" ] || die "usage: $0 start|stop RUN_DIR [DATA_ROOT]"
docker_cli="$(command -v /usr/bin/docker || command -v docker || true)"

case "$command_" in
start)
    data_root="${3:-${SAM_TRIMAP_DOCKER_ROOT:-/var/lib/sam-trimap-docker}}"
    command -v dockerd >/dev/null 2>&1 || die "dockerd is missing: apt-get install docker.io (scripts/install.sh --test does)"
    [ -n "$docker_cli" ] || die "the docker client is missing: apt-get install docker.io"
    [ "$(id -u)" = 0 ] || die "dockerd needs root"
    mkdir -p "$run_dir" "$data_root"
    socket="$run_dir/docker.sock"
    # --bridge=none: no default bridge (compose creates its own networks); --iptables stays on so those
    # networks work. The exec root is short-pathed under RUN_DIR (unix socket paths are limited to 108 bytes).
    nohup dockerd --data-root "$data_root" --exec-root "$run_dir/exec" -p "$run_dir/docker.pid" \
        -H "unix://$socket" --bridge=none --log-level=warn >"$run_dir/dockerd.log" 2>&1 &
    for _ in $(seq 1 120); do
        if DOCKER_HOST="unix://$socket" "$docker_cli" version >/dev/null 2>&1; then
            echo "DOCKER_HOST=unix://$socket"
            exit 0
        fi
        kill -0 $! 2>/dev/null || { tail -n 30 "$run_dir/dockerd.log" >&2; die "dockerd exited"; }
        sleep 0.5
    done
    tail -n 30 "$run_dir/dockerd.log" >&2
    die "dockerd did not answer on $socket within 60 s"
    ;;
stop)
    pid_file="$run_dir/docker.pid"
    if [ -f "$pid_file" ]; then
        pid="$(cat "$pid_file")"
        if kill -TERM "$pid" 2>/dev/null; then
            for _ in $(seq 1 60); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.5
            done
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    # A dockerd that did not exit cleanly leaves its network namespace mounted under the exec root.
    awk -v dir="$run_dir/" 'index($2, dir) == 1 {print $2}' /proc/mounts | sort -r | xargs -r umount -l
    ;;
*)
    die "unknown command $command_ (start|stop)"
    ;;
esac
