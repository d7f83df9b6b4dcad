"""Running ``tests/mpi/two_rank_scenarios.py`` under a launcher, for normal pytest tests.

:func:`run_bounded` starts the launcher in its own process group and kills the whole
group (launcher and ranks) when the bound runs out, so a hung rank never outlives the
test. :func:`check_all_ranks_passed` fails unless every rank ran every scenario.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

SCENARIOS = Path(__file__).with_name("two_rank_scenarios.py")
RANK_REPORT = Path(__file__).with_name("rank_report.py")
REPO = Path(__file__).resolve().parents[2]


def scenario_count() -> int:
    """How many ``test_*`` functions the scenario module defines."""
    tree = ast.parse(SCENARIOS.read_text())
    return sum(
        1
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    )


def pytest_command(outdir: Path) -> list[str]:
    """The per-rank command: pytest with pytest-mpi on the scenario module.

    Each rank writes its output to ``outdir/rank-<N>.txt`` (see ``rank_report.py``).
    """
    return [
        sys.executable,
        str(RANK_REPORT),
        str(outdir),
        "-q",
        "-p",
        "no:cacheprovider",
        "--with-mpi",
        "-o",
        "addopts=",
        str(SCENARIOS),
    ]


def run_bounded(
    command: Sequence[str], timeout: float, env: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """Run ``command`` from the repository root; ``(returncode, combined output)``.

    On timeout the process group is killed and ``AssertionError`` is raised with the
    output so far.
    """
    if env is None:
        # Not the UCX_* settings importing ucxx put in this process's environment
        # (see tests/test_slurm_e2e.py): MPICH's UCX in the ranks would read them.
        env = {k: v for k, v in os.environ.items() if not k.startswith("UCX_")}
    proc = subprocess.Popen(
        list(command),
        cwd=REPO,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(
            f"{' '.join(command)} did not finish within {timeout} s:\n{out}"
        ) from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out


def check_all_ranks_passed(returncode: int, output: str, outdir: Path, ranks: int) -> None:
    """Every rank reported all scenarios passed, none failed or skipped.

    ``output`` is the launcher's own merged output, ``outdir`` holds one report per rank.
    """
    expected = scenario_count()
    reports = {rank: outdir / f"rank-{rank}.txt" for rank in range(ranks)}
    texts = {rank: path.read_text() if path.exists() else "" for rank, path in reports.items()}
    everything = output + "".join(f"\n--- rank {r} ---\n{t}" for r, t in texts.items())
    assert returncode == 0, f"launcher exited with {returncode}:\n{everything}"
    for rank, text in texts.items():
        assert reports[rank].exists(), f"rank {rank} wrote no report:\n{everything}"
        summaries = re.findall(r"^=*\s*(\d+ \w+.*) in [\d.]+s", text, re.MULTILINE)
        assert len(summaries) == 1, f"rank {rank}: no pytest summary:\n{everything}"
        summary = summaries[0]
        assert summary.startswith(f"{expected} passed"), f"rank {rank} {summary!r}:\n{everything}"
        assert "skipped" not in summary and "failed" not in summary, everything
