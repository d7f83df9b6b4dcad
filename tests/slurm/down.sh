#!/usr/bin/env bash
# Stop and remove everything tests/slurm/up.sh started or added: the daemons (by their
# pid files), every process left in the hosts' namespaces, the namespaces, the bridge,
# the /etc/hosts block, route_localnet, then the state directory. Safe after a partial
# start-up, and a no-op when nothing is up.
set -uo pipefail
STATE="${HPCPROC_SLURM_STATE:-/tmp/hpcproc-slurm}"
[ -d "$STATE" ] || exit 0
K=3
BRIDGE=hpbr0
ROUTE_LOCALNET_ALL=0
# shellcheck disable=SC1091
[ -f "$STATE/cluster.env" ] && . "$STATE/cluster.env"
HIDDEN=$((K + 1))

stop() {  # stop <pidfile>...: SIGTERM to all, bounded wait, then SIGKILL
    local pidfile pid pids=()
    for pidfile in "$@"; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
        rm -f "$pidfile"
    done
    [ "${#pids[@]}" -gt 0 ] || return 0
    local alive
    for _ in $(seq 100); do
        alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" -eq 1 ] || break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}

# Jobs first, so that no step is left running on a host being removed.
if [ -f "$STATE/slurm.conf" ] && [ -f "$STATE/slurmctld.pid" ]; then
    SLURM_CONF="$STATE/slurm.conf" timeout 10 scancel --full --quiet --user=root 2>/dev/null || true
fi
slurmds=()
for i in $(seq 1 "$HIDDEN"); do slurmds+=("$STATE/slurmd.host$i.pid" "$STATE/slurmd.hidden$i.pid"); done
stop "${slurmds[@]}" "$STATE/slurmctld.pid"
if [ -f "$STATE/munged.started" ]; then stop /run/munge/munged.pid; fi

for i in $(seq 1 "$HIDDEN"); do
    ns=hpcproc-h$i
    ip netns list | grep -q "^$ns\b" || continue
    # Whatever still runs in the host (slurmstepd, tasks): only this script's
    # namespaces are searched, so only what ran on the test hosts is stopped.
    pids=$(ip netns pids "$ns" 2>/dev/null)
    if [ -n "$pids" ]; then
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        for _ in $(seq 50); do [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && break; sleep 0.1; done
    fi
    ip netns del "$ns"
done
ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE"
sysctl -qw "net.ipv4.conf.all.route_localnet=$ROUTE_LOCALNET_ALL"

# Drop the name block up.sh added (rewritten in place: /etc/hosts may be a mount).
if grep -q '^# hpcproc-cluster begin$' /etc/hosts; then
    kept=$(sed '/^# hpcproc-cluster begin$/,/^# hpcproc-cluster end$/d' /etc/hosts)
    printf '%s\n' "$kept" > /etc/hosts
fi
rm -rf "$STATE"
