"""PBS / Torque, Flux, LSF jsrun, TorchElastic, explicit overrides, local; precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcproc.launchers import LauncherError, detect

from .test_launchers_mpi import HYDRA
from .test_launchers_slurm import SRUN_TASK


@pytest.fixture
def nodefile(tmp_path: Path) -> Path:
    # PBS Pro `select=2:ncpus=2:mpiprocs=2`: one line per MPI slot, FQDNs.
    path = tmp_path / "1234.pbs01.nodefile"
    path.write_text("cn01.cluster\ncn01.cluster\ncn02.cluster\ncn02.cluster\n")
    return path


def test_pbs_pro_batch_script_is_a_single_rank(nodefile: Path) -> None:
    env = {"PBS_JOBID": "1234.pbs01", "PBS_NODEFILE": str(nodefile), "PBS_O_WORKDIR": "/home/u"}
    info = detect(env, hostname="cn01")
    assert (info.launcher, info.rank, info.size) == ("pbs", 0, 1)
    assert info.job_id == "1234.pbs01"
    assert info.server_host == "cn01.cluster"


def test_torque_pbsdsh_task_uses_nodefile_as_host_map(nodefile: Path) -> None:
    env = {
        "PBS_JOBID": "5678.torque",
        "PBS_NODEFILE": str(nodefile),
        "PBS_VNODENUM": "3",
        "PBS_TASKNUM": "4",
        "PBS_NODENUM": "1",
    }
    info = detect(env, hostname="cn02.cluster")
    assert (info.rank, info.size) == (3, 4)
    assert (info.node_index, info.num_nodes, info.local_rank, info.local_size) == (1, 2, 1, 2)
    assert info.hosts == ("cn01.cluster",) * 2 + ("cn02.cluster",) * 2
    assert info.server_host == "cn01.cluster"


def test_pbsdsh_task_on_unexpected_host_has_no_host_map(nodefile: Path) -> None:
    env = {"PBS_JOBID": "5678.torque", "PBS_NODEFILE": str(nodefile), "PBS_VNODENUM": "0"}
    assert detect(env, hostname="cn02").hosts is None


def test_pbsdsh_vnodenum_outside_nodefile_raises(nodefile: Path) -> None:
    env = {"PBS_JOBID": "1.t", "PBS_NODEFILE": str(nodefile), "PBS_VNODENUM": "4"}
    with pytest.raises(LauncherError, match="has 4 lines"):
        detect(env, hostname="cn01")


def test_missing_nodefile_raises_naming_it(tmp_path: Path) -> None:
    env = {"PBS_JOBID": "1.t", "PBS_NODEFILE": str(tmp_path / "gone")}
    with pytest.raises(LauncherError, match="PBS_NODEFILE"):
        detect(env, hostname="cn01")


def test_mpiexec_inside_pbs_is_the_mpi_job(nodefile: Path) -> None:
    env = {"PBS_JOBID": "1234.pbs01", "PBS_NODEFILE": str(nodefile), **HYDRA}
    info = detect(env, hostname="cn01")
    assert (info.launcher, info.rank, info.size) == ("hydra", 1, 2)


def test_flux_task() -> None:
    env = {
        "FLUX_TASK_RANK": "3",
        "FLUX_JOB_SIZE": "4",
        "FLUX_TASK_LOCAL_ID": "1",
        "FLUX_JOB_NNODES": "2",
        "FLUX_JOB_ID": "f2bPn5MZ5",
        "FLUX_URI": "local:///tmp/flux-abc/local-0",
    }
    info = detect(env, hostname="tioga1")
    assert (info.launcher, info.rank, info.size, info.local_rank) == ("flux", 3, 4, 1)
    assert (info.num_nodes, info.job_id) == (2, "f2bPn5MZ5")


def test_lsf_jsrun_task() -> None:
    env = {
        "JSM_NAMESPACE_RANK": "7",
        "JSM_NAMESPACE_SIZE": "12",
        "JSM_NAMESPACE_LOCAL_RANK": "1",
        "JSM_NAMESPACE_LOCAL_SIZE": "6",
        "LSB_JOBID": "998877",
        "LSB_HOSTS": "batch1 c01 c01 c02 c02",
        "OMPI_COMM_WORLD_RANK": "7",
        "OMPI_COMM_WORLD_SIZE": "12",
    }
    # jsrun (Spectrum MPI) also sets OMPI_*; they agree, and Open MPI comes first.
    info = detect(env, hostname="c02")
    assert (info.rank, info.size) == (7, 12)
    lsf_only = {k: v for k, v in env.items() if not k.startswith("OMPI_")}
    info = detect(lsf_only, hostname="c02")
    assert (info.launcher, info.rank, info.size, info.local_size) == ("lsf", 7, 12, 6)
    assert info.job_id == "998877"
    assert info.hosts is None


def test_torchelastic_needs_run_id() -> None:
    plain = {"RANK": "1", "WORLD_SIZE": "2"}
    assert detect(plain, hostname="h").launcher == "local"
    env = {
        **plain,
        "TORCHELASTIC_RUN_ID": "none",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "0",
        "MASTER_ADDR": "h0",
    }
    info = detect(env, hostname="h")
    assert (info.launcher, info.rank, info.size, info.node_index) == ("torchelastic", 1, 2, 0)
    assert info.server_host == "h0"


def test_explicit_overrides_win_over_every_launcher() -> None:
    env = {
        **SRUN_TASK,
        **HYDRA,
        "HPCPROC_RANK": "2",
        "HPCPROC_SIZE": "3",
        "HPCPROC_HOSTS": "a,b[1-2]",
    }
    info = detect(env, hostname="b2")
    assert (info.launcher, info.rank, info.size) == ("explicit", 2, 3)
    assert info.hosts == ("a", "b1", "b2")
    assert (info.node_index, info.num_nodes, info.server_host) == (2, 3, "a")


def test_explicit_rank_without_size_raises() -> None:
    with pytest.raises(LauncherError, match="HPCPROC_SIZE"):
        detect({"HPCPROC_RANK": "0"}, hostname="h")


def test_explicit_hosts_of_wrong_length_raise() -> None:
    with pytest.raises(LauncherError, match="lists 2 hosts"):
        detect({"HPCPROC_RANK": "0", "HPCPROC_SIZE": "3", "HPCPROC_HOSTS": "a,b"}, hostname="h")


def test_explicit_rank_not_below_size_raises() -> None:
    with pytest.raises(LauncherError, match="outside"):
        detect({"HPCPROC_RANK": "3", "HPCPROC_SIZE": "3"}, hostname="h")


def test_no_launcher_is_a_local_run() -> None:
    info = detect({"PATH": "/usr/bin", "HOME": "/root"}, hostname="laptop")
    assert (info.launcher, info.rank, info.size, info.hostname) == ("local", 0, 1, "laptop")
    assert "rank=0 size=1 node_index=0" in info.describe()
