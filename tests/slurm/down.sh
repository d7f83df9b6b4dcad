#!/usr/bin/env bash
# Stop the daemons tests/slurm/up.sh started (by their pid files), then remove the state.
set -uo pipefail
STATE="${HPCPROC_SLURM_STATE:-/tmp/hpcproc-slurm}"
[ -d "$STATE" ] || exit 0

stop() {  # stop <pidfile>: SIGTERM, bounded wait, then SIGKILL
    local pidfile=$1 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

for n in n1 n2 n3; do stop "$STATE/slurmd.$n.pid"; done
stop "$STATE/slurmctld.pid"
if [ -f "$STATE/munged.started" ]; then stop /run/munge/munged.pid; fi
# Drop the name entries up.sh added (rewritten in place: /etc/hosts may be a mount).
if grep -q ' # hpcproc-slurm$' /etc/hosts; then
    kept=$(grep -v ' # hpcproc-slurm$' /etc/hosts)
    printf '%s\n' "$kept" > /etc/hosts
fi
rm -rf "$STATE"
