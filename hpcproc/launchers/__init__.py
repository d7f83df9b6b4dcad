"""Launchers: from a scheduler's environment to this rank's place in the job.

:func:`detect` reads the environment of ``srun``, ``mpirun`` / ``mpiexec`` (Open MPI,
hydra, Cray PALS, MVAPICH), Flux, LSF ``jsrun``, PBS / Torque or explicit
``HPCPROC_*`` overrides and returns a :class:`ClusterInfo`; :mod:`hpcproc.rendezvous` then
lets every rank learn every rank's endpoint address.
"""

from __future__ import annotations

from .detect import detect
from .hostlist import HostlistError, expand_hostlist, parse_task_counts
from .info import ClusterInfo, LauncherError

__all__ = [
    "ClusterInfo",
    "HostlistError",
    "LauncherError",
    "detect",
    "expand_hostlist",
    "parse_task_counts",
]
