"""IBM LSF with ``jsrun`` (JSM): ``JSM_NAMESPACE_*``.

``LSB_JOBID`` is the job id. ``LSB_HOSTS`` / ``LSB_MCPU_HOSTS`` describe the
allocation (including the launch node), not where ``jsrun`` placed each rank, so
``hosts`` stays None.
"""

from __future__ import annotations

from collections.abc import Mapping

from .info import ClusterInfo, env_int, env_opt_int

__all__ = ["detect"]


def detect(env: Mapping[str, str], hostname: str) -> ClusterInfo | None:
    """A jsrun task, or None.

    Raises:
        LauncherError: the variables are malformed.
    """
    if "JSM_NAMESPACE_RANK" not in env:
        return None
    return ClusterInfo(
        launcher="lsf",
        rank=env_int(env, "JSM_NAMESPACE_RANK"),
        size=env_int(env, "JSM_NAMESPACE_SIZE"),
        local_rank=env_opt_int(env, "JSM_NAMESPACE_LOCAL_RANK"),
        local_size=env_opt_int(env, "JSM_NAMESPACE_LOCAL_SIZE"),
        node_index=None,
        num_nodes=None,
        hostname=hostname,
        job_id=env.get("LSB_JOBID"),
        step_id=env.get("JSM_NAMESPACE_JOBSTEP") if "JSM_NAMESPACE_JOBSTEP" in env else None,
        hosts=None,
        server_host=None,
    )
