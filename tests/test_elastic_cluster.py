"""A node joins a running Slurm job as a second step (issue 16, part 1), on the
multi-host cluster: one allocation of host1..host3, a first step running the job on
host1 and host2, a second step (``srun -w host3 python -m hpcproc.join ...``) adding a
worker on host3, which the master uses and then sees leave.

Skipped with the reason when no cluster answers, except under HPCPROC_REQUIRE_SLURM=1,
where a missing cluster is a failure (``tests/test_slurm_e2e.py``'s fixtures).
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.test_slurm_e2e import PYTHON, WAIT, Step, slurm_env  # noqa: F401 (fixture)

pytestmark = pytest.mark.slurm

APP = "tests/test_membership.py:app_elastic"


@pytest.fixture
def allocation(slurm_env: dict[str, str]) -> Iterator[str]:  # noqa: F811
    """A job holding host1..host3 without running anything (salloc --no-shell);
    cancelled afterwards with whatever steps still run in it."""
    name = f"hpcproc-join-{uuid.uuid4().hex[:8]}"
    out = subprocess.run(
        ["salloc", "-N3", "-w", "host1,host2,host3", "--no-shell", f"--job-name={name}"],
        env=slurm_env,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    found = re.search(r"Granted job allocation (\d+)", out.stderr + out.stdout)
    assert out.returncode == 0 and found, out
    try:
        yield found.group(1)
    finally:
        subprocess.run(["scancel", found.group(1)], env=slurm_env, timeout=30, check=False)


@pytest.fixture
def started() -> Iterator[list[Step]]:
    steps: list[Step] = []
    yield steps
    for step in steps:
        step.kill(30)


def step(started: list[Step], env: dict[str, str], job: str, *args: str) -> Step:
    s = Step(["srun", f"--jobid={job}", *args], env, f"step-of-{job}")
    started.append(s)
    return s


def test_second_srun_step_joins_the_running_job_and_leaves_it(
    allocation: str,
    started: list[Step],
    slurm_env: dict[str, str],  # noqa: F811
) -> None:
    job = step(
        started, slurm_env, allocation,
        "-N2", "-n2", "-w", "host1,host2", PYTHON, "-m", "hpcproc.run", APP,
    )  # fmt: skip
    address = job.wait_for_lines(r"^address=", 1)[0].strip().partition("=")[2]
    # auto across hosts is shm+tcp: a joiner on another host dials the tcp part.
    assert re.match(r"nid://route:\S*:tcp://host1:", address), address
    join = ("-N1", "-n1", "-w", "host3", PYTHON, "-m", "hpcproc.join", address, APP)
    first = step(started, slurm_env, allocation, *join)
    line = job.wait_for_lines(r"^joined node on ", 1)[0]
    assert line.strip() == "joined node on host3; members=2", line
    assert job.wait_for_lines(r"^worker sees members=", 1)[0].strip().endswith("=2")
    job.wait_for_lines(r"^ready-for-leave", 1)
    # SIGTERM to the joined node's task (step 1 of the allocation; step 0 is the job):
    # it leaves gracefully. (Slurm 22.05's scancel signals the step, then reports an
    # error about the job id; the effect is checked below instead of its status.)
    subprocess.run(
        ["scancel", "--signal=TERM", f"{allocation}.1"], env=slurm_env, timeout=30, check=False
    )
    line = job.wait_for_lines(r"^left: ", 1)[0]
    assert "left: DiedNodeDown monitor: DiedNodeDown; members=1" in line, line
    assert "worker sees members=1" in line, line
    rc, out = first.finish()
    assert "SIGTERM: leaving the cluster" in out, out
    # A replacement joins the same way, and ends with the job's status.
    second = step(started, slurm_env, allocation, *join)
    assert job.wait_for_lines(r"^second joined on ", 1)[0].strip() == "second joined on host3"
    rc, out = job.finish()
    assert rc == 3, out
    rc, out = second.finish()
    assert rc == 3, out
