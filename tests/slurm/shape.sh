#!/usr/bin/env bash
# Limit the rate of every host's link of the cluster tests/slurm/up.sh started, for
# benchmarks (never in correctness tests):  shape.sh 10gbit  |  shape.sh off
# A token bucket (tc tbf) on the bridge side of each veth, i.e. on traffic towards the
# host; netem (delay, loss) is not available in this kernel.
set -euo pipefail
RATE="${1:?usage: shape.sh RATE (for example 10gbit, 1gbit) | off}"
STATE="${HPCPROC_SLURM_STATE:-/tmp/hpcproc-slurm}"
K=3
# shellcheck disable=SC1091
[ -f "$STATE/cluster.env" ] && . "$STATE/cluster.env"
for i in $(seq 1 $((K + 1))); do
    ip link show "vh$i" >/dev/null 2>&1 || continue
    tc qdisc del dev "vh$i" root 2>/dev/null || true
    if [ "$RATE" != off ]; then
        tc qdisc add dev "vh$i" root tbf rate "$RATE" burst 256kb latency 50ms
    fi
done
tc qdisc show | grep ' dev vh' || true
