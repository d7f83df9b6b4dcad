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
REPO = Path(__file__).resolve().parents[2]


def scenario_count() -> int:
    """How many ``test_*`` functions the scenario module defines."""
    tree = ast.parse(SCENARIOS.read_text())
    return sum(
        1
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    )


def pytest_command() -> list[str]:
    """The per-rank command: pytest with pytest-mpi on the scenario module."""
    return [
        sys.executable,
        "-m",
        "pytest",
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
    proc = subprocess.Popen(
        list(command),
        cwd=REPO,
        env=dict(os.environ if env is None else env),
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


def check_all_ranks_passed(returncode: int, output: str, ranks: int) -> None:
    """Every rank reported all scenarios passed, none failed or skipped."""
    expected = scenario_count()
    summaries = re.findall(r"^=*\s*(\d+ \w+.*) in [\d.]+s", output, re.MULTILINE)
    assert returncode == 0, f"launcher exited with {returncode}:\n{output}"
    assert len(summaries) == ranks, f"expected {ranks} pytest summaries:\n{output}"
    for summary in summaries:
        assert summary.startswith(f"{expected} passed"), f"rank summary {summary!r}:\n{output}"
        assert "skipped" not in summary and "failed" not in summary, output
