"""MVAPICH2's ``mpirun_rsh`` / ``mpiexec``: ``MV2_COMM_WORLD_*``."""

from __future__ import annotations

from collections.abc import Mapping

from .info import ClusterInfo, env_int, env_opt_int

__all__ = ["detect"]


def detect(env: Mapping[str, str], hostname: str) -> ClusterInfo | None:
    """An MVAPICH rank, or None.

    Raises:
        LauncherError: the variables are malformed.
    """
    if "MV2_COMM_WORLD_RANK" not in env:
        return None
    return ClusterInfo(
        launcher="mvapich",
        rank=env_int(env, "MV2_COMM_WORLD_RANK"),
        size=env_int(env, "MV2_COMM_WORLD_SIZE"),
        local_rank=env_opt_int(env, "MV2_COMM_WORLD_LOCAL_RANK"),
        local_size=env_opt_int(env, "MV2_COMM_WORLD_LOCAL_SIZE"),
        node_index=None,
        num_nodes=None,
        hostname=hostname,
        job_id=None,
        step_id=None,
        hosts=None,
        server_host=None,
    )
