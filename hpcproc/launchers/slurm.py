"""SLURM: a task of a job step (``srun``), or a batch / ``salloc`` shell.

Only the step variables describe the ranks started together: ``SLURM_STEP_NUM_TASKS``,
``SLURM_STEP_NODELIST``, ``SLURM_STEP_TASKS_PER_NODE``, with ``SLURM_PROCID``,
``SLURM_LOCALID``, ``SLURM_NODEID`` for this task. The job-wide ``SLURM_NTASKS`` /
``SLURM_NODELIST`` describe the allocation, not a step, and are never used for sizes:
a batch script or an ``salloc`` shell (no step variables, or the interactive step
with one task) is a single rank, not one of a multi-rank step.

The rank-to-host map is computed only for the block distribution (Slurm's default,
``SLURM_DISTRIBUTION`` unset or ``block``), and only after this task checked its own
entry: its node name must be the map's host for its rank, and ``SLURM_GTIDS`` (the
global task ids on this node) must be exactly the block of ranks the map gives this
node. Otherwise ``hosts`` is None. Rank 0 always runs on the step's first node, which
is where the rendezvous store is served.

Node names need not be host names: Slurm's ``NodeName`` may differ from the name DNS
knows (``NodeHostname``) and from the address the daemons use (``NodeAddr``). Where a
node name is to be dialled, :func:`node_address` turns it into something that resolves
(the name itself, else the node's address as Slurm knows it), or fails at once with an
error naming the node and the fix.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
from collections.abc import Mapping

from .hostlist import expand_hostlist, parse_task_counts
from .info import ClusterInfo, LauncherError, env_int, env_opt_int

__all__ = [
    "BATCH_STEP_ID",
    "INTERACTIVE_STEP_ID",
    "SCONTROL_TIMEOUT",
    "UnresolvableNodeError",
    "detect",
    "in_step",
    "node_address",
]

log = logging.getLogger("hpcproc.launchers")

#: Slurm's reserved step ids (SLURM_BATCH_SCRIPT, SLURM_INTERACTIVE_STEP).
BATCH_STEP_ID = 4294967291
INTERACTIVE_STEP_ID = 4294967290

#: Bound on the one ``scontrol show node`` call :func:`node_address` may make (s).
SCONTROL_TIMEOUT = 5.0


class UnresolvableNodeError(LauncherError):
    """A Slurm node name that neither resolves nor has an address Slurm could give."""


def in_step(env: Mapping[str, str]) -> bool:
    """Whether ``env`` is a task of a Slurm job step (step variables present)."""
    return "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env


def detect(env: Mapping[str, str], hostname: str) -> ClusterInfo | None:
    """A task of a Slurm step, a single-rank batch / salloc shell, or None.

    Raises:
        LauncherError: step variables are malformed (the message names the variable).
    """
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not in_step(env):
        if job_id is None:
            return None
        # A batch script or salloc shell: the allocation's shell is one rank.
        return ClusterInfo(
            launcher="slurm",
            rank=0,
            size=1,
            local_rank=0,
            local_size=1,
            node_index=0,
            num_nodes=1,
            hostname=env.get("SLURMD_NODENAME", hostname),
            job_id=job_id,
            step_id="batch" if "SLURM_PROCID" in env else None,
            hosts=None,
            server_host=None,
        )
    node_name = env.get("SLURMD_NODENAME", hostname)
    step_id = env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")
    size = env_int(env, "SLURM_STEP_NUM_TASKS")
    rank = env_int(env, "SLURM_PROCID")
    if rank >= size and "SLURM_HET_SIZE" not in env:
        raise LauncherError(
            f"slurm: rank {rank} is outside 0..{size - 1}"
            f" (SLURM_PROCID={rank}, SLURM_STEP_NUM_TASKS={size})"
        )
    if "SLURM_HET_SIZE" in env:
        return _het_step(env, node_name, job_id, step_id, rank)
    nodes = expand_hostlist(env.get("SLURM_STEP_NODELIST", ""))
    counts = parse_task_counts(env["SLURM_STEP_TASKS_PER_NODE"]) if nodes else []
    node_index = env_opt_int(env, "SLURM_NODEID")
    if nodes and len(counts) != len(nodes):
        raise LauncherError(
            f"slurm: SLURM_STEP_TASKS_PER_NODE={env['SLURM_STEP_TASKS_PER_NODE']!r} has"
            f" {len(counts)} entries for {len(nodes)} nodes in SLURM_STEP_NODELIST"
        )
    if counts and sum(counts) != size:
        raise LauncherError(
            f"slurm: SLURM_STEP_TASKS_PER_NODE sums to {sum(counts)},"
            f" SLURM_STEP_NUM_TASKS is {size}"
        )
    local_size = counts[node_index] if node_index is not None and node_index < len(counts) else None
    return ClusterInfo(
        launcher="slurm",
        rank=rank,
        size=size,
        local_rank=env_opt_int(env, "SLURM_LOCALID"),
        local_size=local_size,
        node_index=node_index,
        num_nodes=len(nodes) if nodes else env_opt_int(env, "SLURM_STEP_NUM_NODES"),
        hostname=node_name,
        job_id=job_id,
        step_id=step_id,
        hosts=_block_hosts(env, nodes, counts, rank, node_index, node_name),
        server_host=nodes[0] if nodes else None,
    )


def _het_group(env: Mapping[str, str], name: str, group: int) -> str | None:
    """``name`` of het component ``group``: ``_HET_GROUP_<i>`` (Slurm >= 20.02 in
    batch / salloc) or ``_PACK_GROUP_<i>`` (what srun still exports in 22.05)."""
    return env.get(f"{name}_HET_GROUP_{group}") or env.get(f"{name}_PACK_GROUP_{group}")


def _het_step(
    env: Mapping[str, str], node_name: str, job_id: str | None, step_id: str | None, rank: int
) -> ClusterInfo:
    """A step across the components of a heterogeneous job.

    Ranks are global (``SLURM_PROCID``) and ``SLURM_STEP_NUM_TASKS`` counts every
    component's tasks, but ``SLURM_STEP_NODELIST`` is the sorted union of the
    components' nodes, which need not follow rank order: no host map. Rank 0 runs on
    the first node of component 0.
    """
    het_size = env_int(env, "SLURM_HET_SIZE")
    group_sizes = [_het_group(env, "SLURM_STEP_NUM_TASKS", i) for i in range(het_size)]
    size = (
        sum(int(n) for n in group_sizes if n is not None)
        if all(n is not None and n.isdigit() for n in group_sizes)
        else env_int(env, "SLURM_STEP_NUM_TASKS")
    )
    first_nodes = (
        _het_group(env, "SLURM_STEP_NODELIST", 0)
        or _het_group(env, "SLURM_JOB_NODELIST", 0)
        or env.get("SLURM_STEP_NODELIST", "")
    )
    nodes = expand_hostlist(first_nodes)
    return ClusterInfo(
        launcher="slurm",
        rank=rank,
        size=size,
        local_rank=env_opt_int(env, "SLURM_LOCALID"),
        local_size=None,
        node_index=env_opt_int(env, "SLURM_NODEID"),
        num_nodes=env_opt_int(env, "SLURM_STEP_NUM_NODES"),
        hostname=node_name,
        job_id=env.get("SLURM_HET_JOB_ID") or env.get("SLURM_PACK_JOB_ID") or job_id,
        step_id=step_id,
        hosts=None,
        server_host=nodes[0] if nodes else None,
    )


def _block_hosts(
    env: Mapping[str, str],
    nodes: list[str],
    counts: list[int],
    rank: int,
    node_index: int | None,
    node_name: str,
) -> tuple[str, ...] | None:
    """Host of every rank under the block distribution, if this task's entry checks out."""
    distribution = env.get("SLURM_DISTRIBUTION", "block")
    if not nodes or distribution.split(":")[0] not in ("block", ""):
        return None
    hosts = tuple(host for host, count in zip(nodes, counts, strict=True) for _ in range(count))
    first = sum(counts[:node_index]) if node_index is not None else None
    expected_gtids = (
        list(range(first, first + counts[node_index]))
        if node_index is not None and first is not None and node_index < len(counts)
        else None
    )
    gtids_text = env.get("SLURM_GTIDS")
    try:
        gtids = [int(g) for g in gtids_text.split(",")] if gtids_text else None
    except ValueError:
        raise LauncherError(f"slurm: SLURM_GTIDS={gtids_text!r} is not a list of ids") from None
    problems = []
    if hosts[rank] != node_name:
        problems.append(
            f"block map puts rank {rank} on {hosts[rank]}, this task runs on {node_name}"
        )
    if gtids is not None and expected_gtids is not None and gtids != expected_gtids:
        problems.append(f"SLURM_GTIDS={gtids_text} but the block map gives {expected_gtids}")
    if problems:
        log.warning("slurm: rank-to-host map not certain: %s", "; ".join(problems))
        return None
    return hosts


# ------------------------------------------------------------------ node addresses

#: One ``SLURM_NODE_ALIASES`` entry: ``name:addr:hostname`` (addr may be ``[ipv6]``).
_ALIAS_RE = re.compile(r"([^:,\[\]]+):(\[[^\]]*\]|[^:,]*):([^,]*)")


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    return True


def _alias_addresses(env: Mapping[str, str], name: str) -> list[str]:
    """The address and host of ``name`` in ``SLURM_NODE_ALIASES`` (cloud / dynamic
    nodes: Slurm sets it for them, ``(null)`` otherwise)."""
    found: list[str] = []
    for match in _ALIAS_RE.finditer(env.get("SLURM_NODE_ALIASES", "")):
        if match[1] == name:
            found += [match[2].strip("[]"), match[3]]
    return found


def _scontrol_addresses(
    name: str, env: Mapping[str, str], scontrol: str, timeout: float
) -> tuple[list[str], str]:
    """``NodeAddr`` and ``NodeHostName`` of node ``name`` as ``scontrol`` reports them,
    and, when it gave none, why (for the error message)."""
    try:
        done = subprocess.run(
            [scontrol, "show", "node", "-o", name],
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        return [], f"{scontrol} is not installed here"
    except subprocess.TimeoutExpired:
        return [], f"{scontrol} show node {name} did not answer within {timeout:g} s"
    except OSError as exc:
        return [], f"{scontrol} show node {name} could not run: {exc}"
    fields = dict(re.findall(r"(\w+)=(\S*)", done.stdout))
    if done.returncode != 0 or fields.get("NodeName") != name:
        # The last line says what went wrong ("fatal: ...", "Node x not found").
        lines = (done.stderr.strip() or done.stdout.strip()).splitlines()
        said = lines[-1][:200] if lines else f"exit status {done.returncode}"
        return [], f"{scontrol} show node {name}: {said}"
    return [fields[k] for k in ("NodeAddr", "NodeHostName") if fields.get(k)], ""


def node_address(
    name: str,
    env: Mapping[str, str] | None = None,
    *,
    hint: str = "",
    scontrol: str = "scontrol",
    timeout: float = SCONTROL_TIMEOUT,
) -> str:
    """A host name or address by which other hosts reach Slurm node ``name``.

    ``name`` itself when it resolves; else the node's address from
    ``SLURM_NODE_ALIASES``, else its ``NodeAddr`` (then ``NodeHostName``) as
    ``scontrol show node`` reports it: the first of those that resolves. May block for
    one name lookup per candidate and one ``scontrol`` call (bounded by ``timeout``).

    Raises:
        UnresolvableNodeError: none of them resolves; the message names the node, what
            was tried, and the fix (``hint`` is appended to it).
    """
    env = os.environ if env is None else env
    if _resolves(name):
        return name
    candidates = _alias_addresses(env, name)
    why = ""
    if not any(_resolves(c) for c in candidates):
        more, why = _scontrol_addresses(name, env, scontrol, timeout)
        candidates += more
    for candidate in candidates:
        if candidate != name and _resolves(candidate):
            log.info("slurm: node %s resolves nowhere; using its address %s", name, candidate)
            return candidate
    tried = [c for c in candidates if c != name]
    if tried:
        found = f"nor do Slurm's addresses for it: {', '.join(tried)}"
    else:
        found = why or "Slurm knows no other address for it: its NodeAddr is its name"
    raise UnresolvableNodeError(
        f"slurm: node name {name!r} does not resolve to an address ({found}). Make the"
        f" node name resolvable (DNS or /etc/hosts) or give the node a NodeAddr in"
        f" slurm.conf{hint}"
    )
