"""Flux: a task of ``flux run`` / ``flux submit``.

Flux sets ``FLUX_TASK_RANK``, ``FLUX_JOB_SIZE`` (tasks in the job),
``FLUX_TASK_LOCAL_ID``, ``FLUX_JOB_NNODES`` and ``FLUX_JOB_ID``; it does not export
the task-to-host map, so ``hosts`` stays None.
"""

from __future__ import annotations

from collections.abc import Mapping

from .info import ClusterInfo, env_int, env_opt_int

__all__ = ["detect"]


def detect(env: Mapping[str, str], hostname: str) -> ClusterInfo | None:
    """A Flux task, or None.

    Raises:
        LauncherError: the variables are malformed.
    """
    if "FLUX_TASK_RANK" not in env:
        return None
    return ClusterInfo(
        launcher="flux",
        rank=env_int(env, "FLUX_TASK_RANK"),
        size=env_int(env, "FLUX_JOB_SIZE"),
        local_rank=env_opt_int(env, "FLUX_TASK_LOCAL_ID"),
        local_size=None,
        node_index=None,
        num_nodes=env_opt_int(env, "FLUX_JOB_NNODES"),
        hostname=hostname,
        job_id=env.get("FLUX_JOB_ID"),
        step_id=None,
        hosts=None,
        server_host=None,
    )
