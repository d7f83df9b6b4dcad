"""TorchElastic / ``torchrun``: ``RANK`` / ``WORLD_SIZE``, only with ``TORCHELASTIC_RUN_ID``.

``RANK`` and ``WORLD_SIZE`` alone are too generic to trust (many tools set them);
``TORCHELASTIC_RUN_ID`` proves the agent started us. ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE`` and ``GROUP_RANK`` (the node's index) come with it;
``MASTER_ADDR`` is the host of rank 0.
"""

from __future__ import annotations

from collections.abc import Mapping

from .info import ClusterInfo, env_int, env_opt_int

__all__ = ["detect"]


def detect(env: Mapping[str, str], hostname: str) -> ClusterInfo | None:
    """A torchrun worker, or None.

    Raises:
        LauncherError: ``RANK`` / ``WORLD_SIZE`` missing or malformed.
    """
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if not run_id or "RANK" not in env:
        return None
    return ClusterInfo(
        launcher="torchelastic",
        rank=env_int(env, "RANK"),
        size=env_int(env, "WORLD_SIZE"),
        local_rank=env_opt_int(env, "LOCAL_RANK"),
        local_size=env_opt_int(env, "LOCAL_WORLD_SIZE"),
        node_index=env_opt_int(env, "GROUP_RANK"),
        num_nodes=env_opt_int(env, "GROUP_WORLD_SIZE"),
        hostname=hostname,
        job_id=run_id,
        step_id=env.get("TORCHELASTIC_RESTART_COUNT"),
        hosts=None,
        server_host=env.get("MASTER_ADDR") or None,
    )
