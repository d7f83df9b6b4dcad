"""Received buffers and transport pools give memory back once the application drops
its messages: two real nodes (``python -m hpcproc.run``; ``mpiexec -n 2`` for mpi)
echo a 256 MiB array 8 times each way over every transport, and RSS (anon + shmem)
returns to within 64 MiB of where it started on both sides (issue 15). A soak of mixed
sizes shows flat memory.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

from tests._lines import LineProcess

from .memory_app import WITHIN_MIB
from .test_mpi_two_ranks import mpiexec

ROOT = Path(__file__).resolve().parent.parent
#: Bound on one run (8 x 256 MiB each way, then up to 30 s to settle).
RUN_BOUND = 240.0
TRANSPORTS = ["tcp", "shm", "ucx", "mpi"]
# Not the bare name "mpi": pytest-mpi would skip such a test outside mpiexec.
IDS = [f"over-{t}" for t in TRANSPORTS]
_NEEDS = {"ucx": "ucxx", "mpi": "mpi4py"}


def _command(transport: str, entry: str) -> list[str]:
    if transport in _NEEDS and importlib.util.find_spec(_NEEDS[transport]) is None:
        pytest.skip(f"the {transport} transport needs {_NEEDS[transport]}")
    run = [sys.executable, "-m", "hpcproc.run"]
    if transport == "mpi":
        return [mpiexec(), "-n", "2", *run, "--transport", "mpi", entry]
    return [*run, "--np", "2", "--transport", transport, entry]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_"))}
    env.update(
        HPCPROC_COOKIE="test-bounded-memory",
        PYTHONPATH=str(ROOT),
        UCX_TLS="tcp,sm,self",
        # Pools return idle memory after this long (default 5 s): the test waits less.
        HPCPROC_POOL_IDLE_S="1",
    )
    env.update(extra)
    return env


def _run(transport: str, entry: str, **extra: str) -> str:
    proc = LineProcess(_command(transport, entry), _env(**extra), ROOT)
    try:
        rc, out = proc.finish(RUN_BOUND)
    finally:
        proc.kill(10)
    assert rc == 0, out
    return out


@pytest.mark.parametrize("transport", TRANSPORTS, ids=IDS)
def test_memory_returns_after_large_messages_are_dropped(transport: str) -> None:
    out = _run(transport, "tests.memory_app:main")
    found = re.findall(r"^rss (\d) (\d+) (\d+) (\d+)$", out, re.M)
    rows = {int(m[0]): (int(m[1]), int(m[2]), int(m[3])) for m in found}
    assert sorted(rows) == [0, 1], out
    for rank, (before, after, peak) in rows.items():
        # The run really held the arrays (or the test would prove nothing)...
        assert peak >= before + 200, (transport, rank, before, after, peak)
        # ... and every byte of it went back once they were dropped.
        assert after <= before + WITHIN_MIB, (
            f"{transport}: rank {rank} kept {after - before} MiB "
            f"(before {before}, after {after}, peak {peak} MiB)"
        )


@pytest.mark.parametrize("transport", TRANSPORTS, ids=IDS)
def test_memory_stays_flat_under_a_soak_of_mixed_sizes(transport: str) -> None:
    out = _run(transport, "tests.memory_app:soak", HPCPROC_SOAK_S="12")
    match = re.search(r"^series ([\d ]+)$", out, re.M)
    assert match, out
    series = [int(v) for v in match[1].split()]
    assert len(series) >= 6, out
    half = len(series) // 2
    # Warm pools reach their size in the first half; the second half does not grow.
    assert max(series[half:]) <= max(series[:half]) + WITHIN_MIB, (transport, series)
