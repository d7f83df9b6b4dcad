"""PBS Pro, OpenPBS and Torque: ``PBS_JOBID``, ``PBS_NODEFILE``, ``pbsdsh``.

``PBS_NODEFILE`` names a file with one line per slot (a host repeated once per
slot, in placement order). ``PBS_JOBID`` is not numeric (``1234.server``). A task
started by ``pbsdsh`` has ``PBS_VNODENUM``, its line index in the node file: that
makes it rank ``PBS_VNODENUM`` of as many ranks as there are lines, and the node file
is the rank-to-host map (certain, once this task's own line matches its host name).
The batch script itself (no ``PBS_VNODENUM``) is a single rank.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from .info import ClusterInfo, LauncherError, env_int

__all__ = ["detect", "read_nodefile"]

log = logging.getLogger("hpcproc.launchers")


def read_nodefile(path: str) -> list[str]:
    """Hosts in ``path``, one per non-empty line, order and repeats kept.

    Raises:
        LauncherError: the file cannot be read (the message names it).
    """
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise LauncherError(f"pbs: cannot read PBS_NODEFILE {path}: {exc}") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def _short(host: str) -> str:
    return host.split(".", 1)[0]


def detect(env: Mapping[str, str], hostname: str) -> ClusterInfo | None:
    """A pbsdsh task, the single-rank batch script, or None outside PBS.

    Raises:
        LauncherError: the node file is unreadable or empty, or ``PBS_VNODENUM`` is
            outside it.
    """
    job_id = env.get("PBS_JOBID")
    if job_id is None:
        return None
    nodefile = env.get("PBS_NODEFILE")
    slots = read_nodefile(nodefile) if nodefile else []
    if nodefile and not slots:
        raise LauncherError(f"pbs: PBS_NODEFILE {nodefile} is empty")
    if "PBS_VNODENUM" not in env:
        return ClusterInfo(
            launcher="pbs",
            rank=0,
            size=1,
            local_rank=0,
            local_size=1,
            node_index=0,
            num_nodes=1,
            hostname=hostname,
            job_id=job_id,
            server_host=slots[0] if slots else None,
        )
    rank = env_int(env, "PBS_VNODENUM")
    if not slots:
        raise LauncherError("pbs: PBS_VNODENUM is set but PBS_NODEFILE is not")
    if rank >= len(slots):
        raise LauncherError(
            f"pbs: PBS_VNODENUM={rank} but PBS_NODEFILE {nodefile} has {len(slots)} lines"
        )
    unique = list(dict.fromkeys(slots))
    own = slots[rank]
    hosts: tuple[str, ...] | None = tuple(slots)
    if _short(own) != _short(hostname):
        log.warning("pbs: node file puts rank %d on %s, this task runs on %s", rank, own, hostname)
        hosts = None
    return ClusterInfo(
        launcher="pbs",
        rank=rank,
        size=len(slots),
        local_rank=slots[:rank].count(own),
        local_size=slots.count(own),
        node_index=unique.index(own),
        num_nodes=len(unique),
        hostname=own if hosts is not None else hostname,
        job_id=job_id,
        step_id=env.get("PBS_TASKNUM"),
        hosts=hosts,
        server_host=slots[0],
    )
