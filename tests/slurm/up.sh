#!/usr/bin/env bash
# Start a Slurm cluster of several hosts on this machine (as root; Debian's slurm-wlm, munge).
#
# Host N (1..K, K = $HPCPROC_CLUSTER_HOSTS, default 3) is a network namespace hpcproc-hN
# with its own hostname (UTS namespace) hostN and address 127.1.0.N on a veth into the
# bridge hpbr0 (127.1.0.254 in the root namespace), and runs one slurmd, NodeName hostN.
# One more host, K+1, has NodeName hiddenK+1 which resolves nowhere (its host name
# hostK+1 and NodeAddr do): the case of a NodeName that is not a DNS name. slurmctld
# and munged run in the root namespace. Ranks on different hosts thus have different
# network stacks, addresses and hostnames; they still share the file system, the
# process table and the kernel (so the same boot id).
#
# Each host also has its own IPC namespace. UCX decides that two processes can share
# memory (its sm transports, posix and sysv) when their boot ids and IPC namespaces
# agree; without it, MPICH's UCX netmod moved the "cross-host" messages of an MPI job
# through shared memory, which real separate hosts cannot do (bench cluster's mpi4py
# Alltoall, 2 hosts x 2 ranks: 30-40 us with one IPC namespace, 90-150 us with one per
# host, as with UCX_TLS=tcp,self).
#
# Names: a block in /etc/hosts between "# hpcproc-cluster begin" / "end" lines.
# State (config, spool, logs, pid files) in $HPCPROC_SLURM_STATE (default
# /tmp/hpcproc-slurm). Clients use it with:  export SLURM_CONF=$STATE/slurm.conf
# tests/slurm/down.sh stops and removes everything this script started or added
# (it is safe to run after a partial start-up).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
STATE="${HPCPROC_SLURM_STATE:-/tmp/hpcproc-slurm}"
K="${HPCPROC_CLUSTER_HOSTS:-3}"
CTLD_PORT="${HPCPROC_SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${HPCPROC_SLURMD_PORT:-17001}"
BRIDGE=hpbr0
CTLD_ADDR=127.1.0.254
HIDDEN=$((K + 1))

if [ -e "$STATE/cluster.env" ]; then
    echo "a cluster is already up ($STATE/cluster.env); stop it with tests/slurm/down.sh" >&2
    exit 1
fi
mkdir -p "$STATE/ctld" "$STATE/spool"
# What down.sh must undo, recorded before it is done.
{
    echo "K=$K"
    echo "BRIDGE=$BRIDGE"
    echo "ROUTE_LOCALNET_ALL=$(sysctl -n net.ipv4.conf.all.route_localnet)"
} > "$STATE/cluster.env"

nodes=""
for i in $(seq 1 "$K"); do
    nodes+="NodeName=host$i NodeAddr=127.1.0.$i CPUs=2 State=UNKNOWN"$'\n'
done
hidden_line="NodeName=hidden$HIDDEN NodeHostname=host$HIDDEN NodeAddr=127.1.0.$HIDDEN CPUs=2 State=UNKNOWN"
sed -e "s|@HOSTNAME@|$(hostname)|g" -e "s|@STATE@|$STATE|g" -e "s|@CTLD_ADDR@|$CTLD_ADDR|g" \
    -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
    -e "s|@DEBUG_NODES@|host[1-$K]|g" -e "s|@HIDDEN_NODE@|hidden$HIDDEN|g" \
    -e "s|@HIDDEN_PEER@|host$K|g" \
    "$here/slurm.conf.in" > "$STATE/slurm.conf.tmp"
# The hidden node first: Slurm orders a job's nodes as they are declared.
python3 - "$STATE/slurm.conf.tmp" "$hidden_line"$'\n'"$nodes" > "$STATE/slurm.conf" <<'PY'
import sys
path, nodes = sys.argv[1], sys.argv[2].rstrip("\n")
sys.stdout.write(open(path).read().replace("@NODES@", nodes))
PY
rm "$STATE/slurm.conf.tmp"
export SLURM_CONF="$STATE/slurm.conf"

# munge: one daemon per machine; reuse a running one.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- munged
    touch "$STATE/munged.started"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n | unmunge >/dev/null

# Names, as on a real cluster: every host name resolves (in every namespace: they
# share /etc/hosts); hiddenN does not. Rewritten in place: /etc/hosts may be a mount.
if ! grep -q '^# hpcproc-cluster begin$' /etc/hosts; then
    block="# hpcproc-cluster begin"$'\n'
    for i in $(seq 1 "$HIDDEN"); do block+="127.1.0.$i host$i"$'\n'; done
    block+="# hpcproc-cluster end"
    printf '%s\n' "$block" >> /etc/hosts
fi

# The network: a bridge in the root namespace, one namespace per host. Linux drops
# 127/8 on non-loopback interfaces unless route_localnet is set on them.
ip link add "$BRIDGE" type bridge
ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
sysctl -qw net.ipv4.conf.all.route_localnet=1
sysctl -qw "net.ipv4.conf.$BRIDGE.route_localnet=1"
for i in $(seq 1 "$HIDDEN"); do
    ns=hpcproc-h$i
    ip netns add "$ns"
    ip link add "vh$i" type veth peer name eth0 netns "$ns"
    ip link set "vh$i" master "$BRIDGE" up
    ip -n "$ns" addr add "127.1.0.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    ip netns exec "$ns" sysctl -qw net.ipv4.conf.all.route_localnet=1
    ip netns exec "$ns" sysctl -qw net.ipv4.conf.eth0.route_localnet=1
    ip -n "$ns" route add 224.0.0.0/4 dev eth0
done

slurmctld -f "$SLURM_CONF"
# nsenter, not `ip netns exec`: the latter remounts /sys, which hides /sys/fs/cgroup
# (slurmd: "Unable to initialize cgroup plugin").
for i in $(seq 1 "$HIDDEN"); do
    node=host$i
    [ "$i" -eq "$HIDDEN" ] && node=hidden$i
    nsenter --net="/run/netns/hpcproc-h$i" unshare -u -i \
        sh -c "hostname host$i; exec slurmd -f '$SLURM_CONF' -N $node"
done

# Bounded wait for every node to register as idle.
want=$((K + 1))
for _ in $(seq 150); do
    if [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" -eq "$want" ]; then
        echo "slurm up: $K hosts (host1..host$K) and hidden$HIDDEN; SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.2
done
echo "slurm did not come up; sinfo:" >&2
sinfo -N >&2 || true
tail -n 20 "$STATE"/*.log >&2 || true
exit 1
