"""SLURM detection from recorded environments (srun task, batch, salloc, het job)."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from hpcproc.launchers import ClusterInfo, LauncherError, detect
from hpcproc.launchers.slurm import UnresolvableNodeError, node_address
from hpcproc.rendezvous import RendezvousError, exchange

# Recorded from `srun -N 3 -n 6` on the test cluster (task 3, on n2).
SRUN_TASK = {
    "SLURM_JOB_ID": "17",
    "SLURM_JOBID": "17",
    "SLURM_STEP_ID": "0",
    "SLURM_STEPID": "0",
    "SLURM_NTASKS": "6",
    "SLURM_NPROCS": "6",
    "SLURM_NNODES": "3",
    "SLURM_NODELIST": "n[1-3]",
    "SLURM_JOB_NODELIST": "n[1-3]",
    "SLURM_TASKS_PER_NODE": "2(x3)",
    "SLURM_STEP_NODELIST": "n[1-3]",
    "SLURM_STEP_NUM_NODES": "3",
    "SLURM_STEP_NUM_TASKS": "6",
    "SLURM_STEP_TASKS_PER_NODE": "2(x3)",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_GTIDS": "2,3",
    "SLURMD_NODENAME": "n2",
}

# The batch script of `sbatch -N 2 -n 4` (recorded): job-wide variables only, plus
# SLURM_PROCID=0 / SLURM_NTASKS=4 which must not be read as a 4-rank step.
SBATCH_SCRIPT = {
    "SLURM_JOB_ID": "2",
    "SLURM_JOBID": "2",
    "SLURM_NTASKS": "4",
    "SLURM_NPROCS": "4",
    "SLURM_NNODES": "2",
    "SLURM_NODELIST": "n[1-2]",
    "SLURM_JOB_NODELIST": "n[1-2]",
    "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_GTIDS": "0",
    "SLURMD_NODENAME": "n1",
}

# An salloc shell on a cluster with LaunchParameters=use_interactive_step.
SALLOC_INTERACTIVE = {
    "SLURM_JOB_ID": "41",
    "SLURM_STEP_ID": "4294967290",
    "SLURM_STEP_NUM_TASKS": "1",
    "SLURM_STEP_NUM_NODES": "1",
    "SLURM_STEP_NODELIST": "nid001",
    "SLURM_STEP_TASKS_PER_NODE": "1",
    "SLURM_NTASKS": "8",
    "SLURM_NODELIST": "nid[001-002]",
    "SLURM_TASKS_PER_NODE": "4(x2)",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_GTIDS": "0",
    "SLURMD_NODENAME": "nid001",
}


def test_srun_task_reads_step_variables() -> None:
    info = detect(SRUN_TASK, hostname="vm")
    assert (info.launcher, info.rank, info.size) == ("slurm", 3, 6)
    assert (info.local_rank, info.local_size) == (1, 2)
    assert (info.node_index, info.num_nodes) == (1, 3)
    assert info.hostname == "n2"
    assert (info.job_id, info.step_id) == ("17", "0")
    assert info.hosts == ("n1", "n1", "n2", "n2", "n3", "n3")
    assert info.server_host == "n1"


def test_srun_step_size_wins_over_job_wide_ntasks() -> None:
    env = {**SRUN_TASK, "SLURM_NTASKS": "48", "SLURM_NODELIST": "n[1-24]"}
    info = detect(env, hostname="vm")
    assert info.size == 6
    assert info.num_nodes == 3


def test_sbatch_script_is_a_single_rank_not_a_step() -> None:
    info = detect(SBATCH_SCRIPT, hostname="vm")
    assert (info.launcher, info.rank, info.size) == ("slurm", 0, 1)
    assert not info.is_multi_rank
    assert info.job_id == "2"
    assert info.hosts is None


def test_salloc_shell_without_step_variables_is_a_single_rank() -> None:
    env = {k: v for k, v in SBATCH_SCRIPT.items() if k not in ("SLURM_PROCID", "SLURM_GTIDS")}
    info = detect(env, hostname="login1")
    assert (info.rank, info.size, info.launcher) == (0, 1, "slurm")


def test_salloc_interactive_step_is_a_single_rank() -> None:
    info = detect(SALLOC_INTERACTIVE, hostname="nid001")
    assert (info.rank, info.size) == (0, 1)
    assert info.step_id == "4294967290"
    assert not info.is_multi_rank


def test_uneven_step_gets_block_host_map() -> None:
    env = {
        **SRUN_TASK,
        "SLURM_STEP_NODELIST": "nid[001-002],gpu-[01]-ib",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2),1",
        "SLURM_STEP_NUM_TASKS": "5",
        "SLURM_PROCID": "4",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "2",
        "SLURM_GTIDS": "4",
        "SLURMD_NODENAME": "gpu-01-ib",
    }
    info = detect(env, hostname="gpu-01-ib")
    assert info.hosts == ("nid001", "nid001", "nid002", "nid002", "gpu-01-ib")
    assert info.local_size == 1
    assert info.server_host == "nid001"


def test_cyclic_distribution_gives_no_host_map() -> None:
    info = detect({**SRUN_TASK, "SLURM_DISTRIBUTION": "cyclic"}, hostname="vm")
    assert info.hosts is None
    assert info.server_host == "n1"


def test_own_entry_mismatch_drops_host_map(caplog: pytest.LogCaptureFixture) -> None:
    env = {**SRUN_TASK, "SLURM_GTIDS": "1,3"}
    with caplog.at_level(logging.WARNING, logger="hpcproc.launchers"):
        info = detect(env, hostname="vm")
    assert info.hosts is None
    assert "SLURM_GTIDS" in caplog.text


def test_own_host_mismatch_drops_host_map() -> None:
    info = detect({**SRUN_TASK, "SLURMD_NODENAME": "n3"}, hostname="vm")
    assert info.hosts is None


def test_heterogeneous_step_has_global_ranks_and_no_host_map() -> None:
    # Task 2 of `srun -n1 : -n2 prog` in a two-component het job (per-component
    # variables carry the _HET_GROUP_<i> suffix).
    env = {
        "SLURM_JOB_ID": "101",
        "SLURM_HET_JOB_ID": "100",
        "SLURM_HET_SIZE": "2",
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NODELIST": "b[1-2]",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
        "SLURM_STEP_NUM_TASKS_HET_GROUP_0": "1",
        "SLURM_STEP_NUM_TASKS_HET_GROUP_1": "2",
        "SLURM_STEP_NODELIST_HET_GROUP_0": "a1",
        "SLURM_STEP_NODELIST_HET_GROUP_1": "b[1-2]",
        "SLURM_PROCID": "2",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "1",
        "SLURMD_NODENAME": "b2",
    }
    info = detect(env, hostname="b2")
    assert (info.rank, info.size) == (2, 3)
    assert info.hosts is None
    assert info.server_host == "a1"
    assert info.job_id == "100"


# Recorded on the test cluster (Slurm 22.05): task 2 of `srun -N1 -n1 : -N2 -n2`.
HET_STEP_RECORDED = {
    "SLURMD_NODENAME": "n3",
    "SLURM_GTIDS": "2",
    "SLURM_HET_SIZE": "2",
    "SLURM_JOB_ID": "24",
    "SLURM_JOB_ID_PACK_GROUP_0": "24",
    "SLURM_JOB_ID_PACK_GROUP_1": "25",
    "SLURM_JOB_NODELIST": "n[1-3]",
    "SLURM_JOB_NODELIST_PACK_GROUP_0": "n1",
    "SLURM_JOB_NODELIST_PACK_GROUP_1": "n[2-3]",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "2",
    "SLURM_NODELIST": "n[1-3]",
    "SLURM_NTASKS": "3",
    "SLURM_PROCID": "2",
    "SLURM_STEPID": "0",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NODELIST": "n[1-3]",
    "SLURM_STEP_NUM_NODES": "3",
    "SLURM_STEP_NUM_TASKS": "3",
    "SLURM_STEP_TASKS_PER_NODE": "1(x3)",
}


def test_recorded_heterogeneous_step_uses_pack_group_variables() -> None:
    info = detect(HET_STEP_RECORDED, hostname="vm")
    assert (info.rank, info.size, info.node_index, info.num_nodes) == (2, 3, 2, 3)
    assert (info.job_id, info.step_id, info.hostname) == ("24", "0", "n3")
    assert info.hosts is None
    assert info.server_host == "n1"


def test_inconsistent_task_counts_raise_naming_the_variable() -> None:
    with pytest.raises(LauncherError, match="SLURM_STEP_TASKS_PER_NODE"):
        detect({**SRUN_TASK, "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}, hostname="vm")
    with pytest.raises(LauncherError, match="SLURM_STEP_NUM_TASKS"):
        detect({**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "7"}, hostname="vm")


def test_rank_outside_step_raises() -> None:
    env = {**SRUN_TASK, "SLURM_PROCID": "6"}
    with pytest.raises(LauncherError, match="rank 6 is outside"):
        detect(env, hostname="vm")


def test_non_numeric_procid_raises_naming_it() -> None:
    with pytest.raises(LauncherError, match="SLURM_PROCID"):
        detect({**SRUN_TASK, "SLURM_PROCID": "three"}, hostname="vm")


# ------------------------------------------------------------ node names that do not resolve

# Reserved (RFC 6761): never resolves.
UNRESOLVABLE = "hidden-node.invalid"


def fake_scontrol(tmp_path: Path, body: str) -> str:
    """An executable ``scontrol`` running the shell ``body``; returns its path."""
    path = tmp_path / "scontrol"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_node_name_that_resolves_is_used_as_is_without_asking_slurm(tmp_path: Path) -> None:
    marker = tmp_path / "asked"
    scontrol = fake_scontrol(tmp_path, f"touch {marker}; exit 1")
    assert node_address("localhost", {}, scontrol=scontrol) == "localhost"
    assert not marker.exists()


def test_unresolvable_node_name_is_reached_at_the_node_addr_slurm_reports(
    tmp_path: Path,
) -> None:
    scontrol = fake_scontrol(
        tmp_path,
        f'[ "$*" = "show node -o {UNRESOLVABLE}" ] || exit 2\n'
        f"echo 'NodeName={UNRESOLVABLE} Arch=x86_64 NodeAddr=127.0.0.1"
        f" NodeHostName={UNRESOLVABLE} State=IDLE'",
    )
    assert node_address(UNRESOLVABLE, {}, scontrol=scontrol) == "127.0.0.1"


def test_node_hostname_is_used_when_node_addr_does_not_resolve(tmp_path: Path) -> None:
    scontrol = fake_scontrol(
        tmp_path,
        f"echo 'NodeName={UNRESOLVABLE} NodeAddr={UNRESOLVABLE} NodeHostName=localhost'",
    )
    assert node_address(UNRESOLVABLE, {}, scontrol=scontrol) == "localhost"


def test_slurm_node_aliases_give_the_address_without_scontrol(tmp_path: Path) -> None:
    scontrol = fake_scontrol(tmp_path, "exit 1")
    env = {"SLURM_NODE_ALIASES": f"cloud1:10.9.9.9:cloud1,{UNRESOLVABLE}:127.0.0.1:somehost"}
    assert node_address(UNRESOLVABLE, env, scontrol=scontrol) == "127.0.0.1"


def test_unresolvable_node_slurm_cannot_place_fails_naming_it_slurms_answer_and_fix(
    tmp_path: Path,
) -> None:
    scontrol = fake_scontrol(tmp_path, f"echo 'Node {UNRESOLVABLE} not found' >&2; exit 1")
    with pytest.raises(UnresolvableNodeError) as info:
        node_address(UNRESOLVABLE, {}, scontrol=scontrol, hint="; or set HPCPROC_X")
    text = str(info.value)
    assert f"node name {UNRESOLVABLE!r} does not resolve" in text, text
    assert f"Node {UNRESOLVABLE} not found" in text, text
    assert "NodeAddr" in text and text.endswith("; or set HPCPROC_X"), text
    assert isinstance(info.value, LauncherError)


def test_node_addr_that_does_not_resolve_either_is_named(tmp_path: Path) -> None:
    scontrol = fake_scontrol(
        tmp_path, f"echo 'NodeName={UNRESOLVABLE} NodeAddr=addr.invalid NodeHostName=x.invalid'"
    )
    with pytest.raises(UnresolvableNodeError, match=r"addr\.invalid, x\.invalid"):
        node_address(UNRESOLVABLE, {}, scontrol=scontrol)


def test_missing_scontrol_is_named(tmp_path: Path) -> None:
    with pytest.raises(UnresolvableNodeError, match="is not installed"):
        node_address(UNRESOLVABLE, {}, scontrol=str(tmp_path / "no-scontrol"))


def test_hung_scontrol_is_abandoned_after_its_timeout(tmp_path: Path) -> None:
    scontrol = fake_scontrol(tmp_path, "exec sleep 60")
    with pytest.raises(UnresolvableNodeError, match=r"did not answer within 0\.5 s"):
        node_address(UNRESOLVABLE, {}, scontrol=scontrol, timeout=0.5)


def test_rendezvous_with_rank_zero_on_an_unplaceable_node_fails_at_once_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layer above: a rank dialling rank 0's store does not retry an unresolvable
    name for the whole timeout (600 s here, beyond the test's own bound)."""
    fake_scontrol(tmp_path, "echo 'slurm_load_node error: Invalid node name' >&2; exit 1")
    monkeypatch.setenv("HPCPROC_COOKIE", "slurm-resolve-test")
    info = ClusterInfo(
        launcher="slurm",
        rank=1,
        size=2,
        local_rank=0,
        local_size=1,
        node_index=1,
        num_nodes=2,
        hostname="localhost",
        job_id="7",
        step_id="0",
        server_host=UNRESOLVABLE,
    )
    env = {"PATH": f"{tmp_path}:{os.environ.get('PATH', '/usr/bin:/bin')}"}

    async def attempt() -> None:
        await exchange(info, b"payload", timeout=600.0, env=env)

    with pytest.raises(RendezvousError) as raised:
        asyncio.run(asyncio.wait_for(attempt(), 60.0))
    text = str(raised.value)
    assert f"rank 0's host: slurm: node name {UNRESOLVABLE!r} does not resolve" in text, text
    assert "Invalid node name" in text and "HPCPROC_RENDEZVOUS_HOST" in text, text
    assert "job 7, step 0" in text, text
