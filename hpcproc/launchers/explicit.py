"""Explicit overrides: ``HPCPROC_RANK``, ``HPCPROC_SIZE``, ``HPCPROC_HOSTS``.

Set by ``hpcproc.run --np N`` for the local nodes it starts, and by users whose
launcher hpcproc does not know. ``HPCPROC_HOSTS`` is a Slurm-style hostlist with one
host per rank (``node[1-2],node[1-2]`` is four ranks); it is trusted as given, but
this rank still checks that it has ``size`` entries. Optional: ``HPCPROC_LOCAL_RANK``,
``HPCPROC_LOCAL_SIZE``, ``HPCPROC_NODE_INDEX``, ``HPCPROC_JOB_ID``.
"""

from __future__ import annotations

from collections.abc import Mapping

from .hostlist import expand_hostlist
from .info import ClusterInfo, LauncherError, env_int, env_opt_int

__all__ = ["detect"]


def detect(env: Mapping[str, str], hostname: str) -> ClusterInfo | None:
    """The explicit description, or None when ``HPCPROC_RANK`` is unset.

    Raises:
        LauncherError: ``HPCPROC_RANK`` without ``HPCPROC_SIZE``, or malformed values.
    """
    if "HPCPROC_RANK" not in env:
        return None
    if "HPCPROC_SIZE" not in env:
        raise LauncherError("HPCPROC_RANK is set but HPCPROC_SIZE is not")
    size = env_int(env, "HPCPROC_SIZE")
    hosts_text = env.get("HPCPROC_HOSTS")
    hosts = tuple(expand_hostlist(hosts_text)) if hosts_text else None
    if hosts is not None and len(hosts) != size:
        raise LauncherError(
            f"HPCPROC_HOSTS={hosts_text!r} lists {len(hosts)} hosts for HPCPROC_SIZE={size}"
        )
    unique = list(dict.fromkeys(hosts)) if hosts else None
    rank = env_int(env, "HPCPROC_RANK")
    own_host = hosts[rank] if hosts is not None and rank < size else hostname
    return ClusterInfo(
        launcher="explicit",
        rank=rank,
        size=size,
        local_rank=env_opt_int(env, "HPCPROC_LOCAL_RANK"),
        local_size=env_opt_int(env, "HPCPROC_LOCAL_SIZE"),
        node_index=(
            env_opt_int(env, "HPCPROC_NODE_INDEX") if unique is None else unique.index(own_host)
        ),
        num_nodes=len(unique) if unique else None,
        hostname=own_host,
        job_id=env.get("HPCPROC_JOB_ID"),
        step_id=None,
        hosts=hosts,
        server_host=hosts[0] if hosts else None,
    )
