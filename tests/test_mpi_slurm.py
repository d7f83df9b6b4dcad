"""The mpi transport under ``srun --mpi=pmi2 -N 2 -n 2`` on a real SLURM cluster.

Skipped, with the reason, unless a cluster answers ``sinfo``; with
``HPCPROC_REQUIRE_SLURM=1`` (CI, which starts one with tests/slurm/up.sh) a missing
cluster fails the test instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from .mpi.launch import check_all_ranks_passed, pytest_command, run_bounded

pytest.importorskip("mpi4py", reason="the mpi transport needs mpi4py (pip install hpcproc[mpi])")

#: Below pytest-timeout's 120 s, so that a hung step is killed and cancelled here.
TIMEOUT = 100.0


def slurm_unavailable() -> str | None:
    """Why no SLURM cluster can be used here, or ``None`` when ``sinfo`` answers."""
    if shutil.which("sinfo") is None or shutil.which("srun") is None:
        return "SLURM client commands (sinfo, srun) are not installed"
    try:
        probe = subprocess.run(
            ["sinfo", "-h", "-o", "%D"], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s"
    if probe.returncode != 0:
        return f"no SLURM cluster answers sinfo: {probe.stderr.strip()[:200]}"
    nodes = sum(int(n) for n in probe.stdout.split() if n.isdigit())
    if nodes < 2:
        return f"the SLURM cluster has {nodes} node(s); the test needs 2"
    return None


@pytest.mark.slurm
def test_conformance_scenarios_pass_in_both_ranks_under_srun_pmi2(tmp_path: Path) -> None:
    reason = slurm_unavailable()
    if reason is not None:
        if os.environ.get("HPCPROC_REQUIRE_SLURM") == "1":
            pytest.fail(f"HPCPROC_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    name = f"hpcproc-mpi-{uuid.uuid4().hex[:8]}"
    command = [
        "srun",
        f"--job-name={name}",
        "--mpi=pmi2",
        "-N",
        "2",
        "-n",
        "2",
        "--time=4",
        *pytest_command(tmp_path),
    ]
    try:
        # As tests/test_slurm_e2e.py's slurm_env: no UCX_* of this process, and the
        # test cluster's one device (a short UCX address for Slurm's PMI-1).
        env = {k: v for k, v in os.environ.items() if not k.startswith("UCX_")}
        env["UCX_NET_DEVICES"] = "eth0"
        returncode, output = run_bounded(command, TIMEOUT, env)
    finally:
        # A step that did not finish must not hold the nodes the next tests need.
        subprocess.run(["scancel", f"--name={name}"], capture_output=True, timeout=30)
    check_all_ranks_passed(returncode, output, tmp_path, ranks=2)
