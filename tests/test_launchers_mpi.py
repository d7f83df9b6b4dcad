"""MPI launchers from recorded environments: Open MPI, hydra, Cray PALS, MVAPICH,
srun --mpi=pmi2, and mpirun inside a Slurm allocation (MPI wins, logged)."""

from __future__ import annotations

import logging

import pytest

from hpcproc.launchers import LauncherError, detect

from .test_launchers_slurm import SRUN_TASK

OPENMPI = {
    "OMPI_COMM_WORLD_RANK": "5",
    "OMPI_COMM_WORLD_SIZE": "8",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
    "OMPI_COMM_WORLD_NODE_RANK": "1",
    "PMIX_RANK": "5",
    "PMIX_NAMESPACE": "prterun-host-1234@1",
}

# Recorded from the mpich wheel's `mpiexec -n 2` (hydra).
HYDRA = {
    "PMI_RANK": "1",
    "PMI_SIZE": "2",
    "PMI_FD": "11",
    "PMI_HOSTNAME": "vm",
    "MPI_LOCALRANKID": "1",
    "MPI_LOCALNRANKS": "2",
}

# Cray PALS (`mpiexec` on HPE Cray EX): PMI_* from Cray PMI plus PALS_* ids.
PALS = {
    "PMI_RANK": "9",
    "PMI_SIZE": "16",
    "PMI_LOCAL_RANK": "1",
    "PMI_LOCAL_SIZE": "8",
    "PALS_RANKID": "9",
    "PALS_LOCAL_RANKID": "1",
    "PALS_NODEID": "1",
    "PALS_APID": "6cd8f0b0-6a9f-4b1e-8f43-1a2b3c4d5e6f",
    "PALS_DEPTH": "1",
}

MVAPICH = {
    "MV2_COMM_WORLD_RANK": "2",
    "MV2_COMM_WORLD_SIZE": "4",
    "MV2_COMM_WORLD_LOCAL_RANK": "0",
    "MV2_COMM_WORLD_LOCAL_SIZE": "2",
}


def test_openmpi_rank() -> None:
    info = detect(OPENMPI, hostname="c1")
    assert (info.launcher, info.rank, info.size) == ("openmpi", 5, 8)
    assert (info.local_rank, info.local_size) == (1, 4)
    assert info.node_index is None
    assert info.hosts is None
    assert info.job_id == "prterun-host-1234@1"


def test_hydra_rank() -> None:
    info = detect(HYDRA, hostname="vm")
    assert (info.launcher, info.rank, info.size) == ("hydra", 1, 2)
    assert (info.local_rank, info.local_size) == (1, 2)


def test_cray_pals_rank_uses_pals_node_id() -> None:
    info = detect(PALS, hostname="nid001234")
    assert (info.launcher, info.rank, info.size) == ("pals", 9, 16)
    assert (info.local_rank, info.local_size, info.node_index) == (1, 8, 1)
    assert info.job_id == PALS["PALS_APID"]


def test_cray_pals_rank_disagreeing_with_pmi_raises() -> None:
    with pytest.raises(LauncherError, match="PALS_RANKID"):
        detect({**PALS, "PALS_RANKID": "3"}, hostname="nid001234")


def test_mvapich_rank() -> None:
    info = detect(MVAPICH, hostname="c1")
    assert (info.launcher, info.rank, info.size, info.local_size) == ("mvapich", 2, 4, 2)


def test_srun_pmi2_merges_slurm_placement() -> None:
    # Recorded from `srun --mpi=pmi2 -N 3 -n 6`: PMI_* and the step variables agree.
    env = {**SRUN_TASK, "PMI_RANK": "3", "PMI_SIZE": "6", "PMI_FD": "11", "PMI_JOBID": "17.0"}
    info = detect(env, hostname="vm")
    assert info.launcher == "slurm+pmi"
    assert (info.rank, info.size, info.node_index) == (3, 6, 1)
    assert info.hosts == ("n1", "n1", "n2", "n2", "n3", "n3")
    assert (info.job_id, info.step_id) == ("17", "0")


def test_mpirun_inside_slurm_step_mpi_size_wins_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # `srun -n1 mpirun -n 4 prog`: the Slurm step has one task, Open MPI four.
    step = {
        **SRUN_TASK,
        "SLURM_STEP_NUM_TASKS": "1",
        "SLURM_STEP_NODELIST": "n1",
        "SLURM_STEP_NUM_NODES": "1",
        "SLURM_STEP_TASKS_PER_NODE": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_GTIDS": "0",
        "SLURMD_NODENAME": "n1",
    }
    env = {**step, **{**OPENMPI, "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"}}
    with caplog.at_level(logging.WARNING, logger="hpcproc.launchers"):
        info = detect(env, hostname="n1")
    assert (info.launcher, info.rank, info.size) == ("openmpi", 3, 4)
    assert "MPI launcher wins" in caplog.text


def test_mpirun_inside_batch_script_is_the_mpi_job() -> None:
    from .test_launchers_slurm import SBATCH_SCRIPT

    info = detect({**SBATCH_SCRIPT, **HYDRA}, hostname="n1")
    assert (info.launcher, info.rank, info.size) == ("hydra", 1, 2)
