"""PMI launchers: MPICH's hydra ``mpiexec``, Cray PALS, ``srun --mpi=pmi2``.

All set ``PMI_RANK`` / ``PMI_SIZE``. Hydra adds ``MPI_LOCALRANKID`` /
``MPI_LOCALNRANKS``; Cray PALS adds ``PALS_RANKID``, ``PALS_LOCAL_RANKID``,
``PALS_NODEID`` (the node's index) and ``PALS_APID`` (the application id), and Cray
PMI ``PMI_LOCAL_RANK`` / ``PMI_LOCAL_SIZE``. Under ``srun`` the Slurm step variables
are present too; :mod:`hpcproc.launchers.detect` merges them when they agree.
"""

from __future__ import annotations

from collections.abc import Mapping

from .info import ClusterInfo, LauncherError, env_int, env_opt_int

__all__ = ["detect"]


def detect(env: Mapping[str, str], hostname: str) -> ClusterInfo | None:
    """A PMI rank (``launcher`` "pals", "hydra", or "pmi" for another PMI server), or None.

    Raises:
        LauncherError: the variables are malformed, or ``PALS_RANKID`` disagrees
            with ``PMI_RANK``.
    """
    if "PMI_RANK" not in env:
        return None
    rank = env_int(env, "PMI_RANK")
    pals = "PALS_RANKID" in env
    if pals and env_int(env, "PALS_RANKID") != rank:
        raise LauncherError(f"PALS_RANKID={env['PALS_RANKID']} but PMI_RANK={rank}")
    local_rank = env_opt_int(env, "PALS_LOCAL_RANKID")
    if local_rank is None:
        local_rank = env_opt_int(env, "PMI_LOCAL_RANK")
    if local_rank is None:
        local_rank = env_opt_int(env, "MPI_LOCALRANKID")
    local_size = env_opt_int(env, "PALS_LOCAL_SIZE")
    if local_size is None:
        local_size = env_opt_int(env, "PMI_LOCAL_SIZE")
    if local_size is None:
        local_size = env_opt_int(env, "MPI_LOCALNRANKS")
    return ClusterInfo(
        launcher="pals" if pals else "hydra" if "MPI_LOCALRANKID" in env else "pmi",
        rank=rank,
        size=env_int(env, "PMI_SIZE"),
        local_rank=local_rank,
        local_size=local_size,
        node_index=env_opt_int(env, "PALS_NODEID"),
        num_nodes=None,
        hostname=env.get("PMI_HOSTNAME") or hostname,
        job_id=env.get("PALS_APID") or env.get("PMI_JOBID"),
        step_id=None,
        hosts=None,
        server_host=None,
    )
