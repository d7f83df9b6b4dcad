#!/usr/bin/env bash
# Start a real Slurm cluster on this machine: munge, one slurmctld, three slurmd (n1..n3).
#
# State (config, spool, logs, pid files) lives in $HPCPROC_SLURM_STATE
# (default /tmp/hpcproc-slurm). Clients use it with:  export SLURM_CONF=$STATE/slurm.conf
# Stop everything with tests/slurm/down.sh. Needs root, slurm-wlm and munge.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
STATE="${HPCPROC_SLURM_STATE:-/tmp/hpcproc-slurm}"
CTLD_PORT="${HPCPROC_SLURMCTLD_PORT:-6817}"
SLURMD_PORTS="${HPCPROC_SLURMD_PORTS:-17001-17003}"

mkdir -p "$STATE/ctld" "$STATE/spool"
sed -e "s|@HOSTNAME@|$(hostname)|g" -e "s|@STATE@|$STATE|g" \
    -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORTS@|$SLURMD_PORTS|g" \
    "$here/slurm.conf.in" > "$STATE/slurm.conf"
export SLURM_CONF="$STATE/slurm.conf"

# munge: one daemon per machine; reuse a running one.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- munged
    touch "$STATE/munged.started"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n | unmunge >/dev/null

# The node names must resolve, as on a real cluster (ranks reach the rendezvous store
# on the first node by its name). All three are this machine.
for n in n1 n2 n3; do
    getent hosts "$n" >/dev/null || echo "127.0.0.1 $n # hpcproc-slurm" >> /etc/hosts
done

slurmctld -f "$SLURM_CONF"
for n in n1 n2 n3; do slurmd -f "$SLURM_CONF" -N "$n"; done

# Bounded wait for the three nodes to register as idle.
for _ in $(seq 150); do
    if [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" -eq 3 ]; then
        echo "slurm up: SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.2
done
echo "slurm did not come up; sinfo:" >&2
sinfo -N >&2 || true
tail -n 20 "$STATE"/*.log >&2 || true
exit 1
