"""The mpi transport across two real MPI ranks: ``mpiexec -n 2`` from a normal test.

The scenarios (``tests/mpi/two_rank_scenarios.py``) run under pytest-mpi in both
ranks; a failure in either rank, a hang, or a scenario that did not run fails this test.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from .mpi.launch import check_all_ranks_passed, pytest_command, run_bounded

pytest.importorskip("mpi4py", reason="the mpi transport needs mpi4py (pip install hpcproc[mpi])")

TIMEOUT = 300.0


def mpiexec() -> str:
    beside = Path(sys.executable).with_name("mpiexec")
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    assert found, "mpi4py is installed but no mpiexec was found (pip install mpich)"
    return found


def test_conformance_scenarios_pass_in_both_ranks_under_mpiexec(tmp_path: Path) -> None:
    command = [mpiexec(), "-n", "2", *pytest_command(tmp_path)]
    returncode, output = run_bounded(command, TIMEOUT)
    check_all_ranks_passed(returncode, output, tmp_path, ranks=2)
