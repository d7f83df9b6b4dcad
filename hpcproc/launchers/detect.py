"""Which launcher started this process, innermost first, with cross-checks.

Precedence (the first family whose variables are present wins):

1. explicit ``HPCPROC_RANK`` / ``HPCPROC_SIZE`` (:mod:`.explicit`)
2. TorchElastic, only with ``TORCHELASTIC_RUN_ID`` (:mod:`.torchelastic`)
3. Open MPI ``OMPI_COMM_WORLD_*`` (:mod:`.openmpi`)
4. PMI / hydra ``PMI_RANK`` with Cray PALS ids (:mod:`.pmi`)
5. MVAPICH ``MV2_COMM_WORLD_*`` (:mod:`.mvapich`)
6. Flux (:mod:`.flux`)
7. LSF jsrun (:mod:`.lsf`)
8. SLURM, step variables only (:mod:`.slurm`)
9. PBS (:mod:`.pbs`)
10. a local run: rank 0 of 1.

An MPI launcher (3-5) runs inside an outer allocation: ``mpirun`` inside a Slurm job
is the MPI job, not the Slurm step, so when both describe a step and disagree on the
size, the MPI variables win and the disagreement is logged. When they agree
(``srun --mpi=pmi2``), Slurm's node index, host map, job and step ids fill the gaps.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import replace

from . import explicit, flux, lsf, mvapich, openmpi, pbs, pmi, slurm, torchelastic
from .info import ClusterInfo

__all__ = ["MPI_LAUNCHERS", "PRECEDENCE", "detect"]

log = logging.getLogger("hpcproc.launchers")

Detector = Callable[[Mapping[str, str], str], "ClusterInfo | None"]

#: (name, detector), innermost launcher first.
PRECEDENCE: tuple[tuple[str, Detector], ...] = (
    ("explicit", explicit.detect),
    ("torchelastic", torchelastic.detect),
    ("openmpi", openmpi.detect),
    ("pmi", pmi.detect),
    ("mvapich", mvapich.detect),
    ("flux", flux.detect),
    ("lsf", lsf.detect),
    ("slurm", slurm.detect),
    ("pbs", pbs.detect),
)

#: Families that are MPI launchers (cross-checked against a Slurm step).
MPI_LAUNCHERS = frozenset({"openmpi", "pmi", "mvapich"})


def detect(env: Mapping[str, str] | None = None, hostname: str | None = None) -> ClusterInfo:
    """Describe this rank from ``env`` (default ``os.environ``).

    Never returns an inconsistent description: ``0 <= rank < size`` always holds.

    Raises:
        LauncherError: the winning launcher's variables are malformed or inconsistent
            (the message names the variable and the launcher).
    """
    env = os.environ if env is None else env
    hostname = hostname or socket.gethostname()
    for family, detector in PRECEDENCE:
        info = detector(env, hostname)
        if info is None:
            continue
        if family in MPI_LAUNCHERS and slurm.in_step(env):
            return _cross_check_slurm(info, env, hostname)
        return info
    return ClusterInfo(
        launcher="local",
        rank=0,
        size=1,
        local_rank=0,
        local_size=1,
        node_index=0,
        num_nodes=1,
        hostname=hostname,
    )


def _cross_check_slurm(mpi: ClusterInfo, env: Mapping[str, str], hostname: str) -> ClusterInfo:
    step = slurm.detect(env, hostname)
    if step is None:
        return mpi
    if step.size != mpi.size:
        log.warning(
            "%s (size %d) runs inside Slurm step %s.%s (size %d): the MPI launcher wins",
            mpi.launcher,
            mpi.size,
            step.job_id,
            step.step_id,
            step.size,
        )
        return mpi
    if step.rank != mpi.rank:
        log.warning(
            "%s rank %d is Slurm rank %d: keeping the MPI rank, ignoring Slurm's placement",
            mpi.launcher,
            mpi.rank,
            step.rank,
        )
        return mpi
    return replace(
        step,
        launcher=f"slurm+{mpi.launcher}",
        local_rank=mpi.local_rank if mpi.local_rank is not None else step.local_rank,
        local_size=mpi.local_size if mpi.local_size is not None else step.local_size,
    )
