"""Open MPI's ``mpirun`` / ``prterun``: ``OMPI_COMM_WORLD_*``.

Open MPI gives rank, size and the node-local rank and size, but neither the node's
index nor any rank's host, so ``hosts`` stays None (the rendezvous then needs MPI,
a shared directory, or ``HPCPROC_RENDEZVOUS_HOST``).
"""

from __future__ import annotations

from collections.abc import Mapping

from .info import ClusterInfo, env_int, env_opt_int

__all__ = ["detect"]


def detect(env: Mapping[str, str], hostname: str) -> ClusterInfo | None:
    """An Open MPI rank, or None.

    Raises:
        LauncherError: the variables are malformed.
    """
    if "OMPI_COMM_WORLD_RANK" not in env:
        return None
    return ClusterInfo(
        launcher="openmpi",
        rank=env_int(env, "OMPI_COMM_WORLD_RANK"),
        size=env_int(env, "OMPI_COMM_WORLD_SIZE"),
        local_rank=env_opt_int(env, "OMPI_COMM_WORLD_LOCAL_RANK"),
        local_size=env_opt_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE"),
        node_index=None,
        num_nodes=None,
        hostname=hostname,
        job_id=env.get("PMIX_NAMESPACE") or env.get("OMPI_MCA_ess_base_jobid"),
        step_id=None,
        hosts=None,
        server_host=None,
    )
