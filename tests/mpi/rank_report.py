"""Per-rank entry point: run the scenario module with this rank's output in its own file.

Usage: ``python tests/mpi/rank_report.py OUTDIR PYTEST_ARGS...``

Launchers merge the ranks' output streams, and two ranks printing at once interleave
within a line, so the summaries cannot be parsed from the merged stream. Each rank
therefore sends its own stdout and stderr to ``OUTDIR/rank-<N>.txt``, initialises MPI
as hpcproc does (``hpcproc.mpi_init.import_mpi``: see why there; pytest-mpi
would otherwise initialise it its own way), and runs pytest in this same process, the
one the launcher started.
"""

from __future__ import annotations

import os
import sys

# The launcher-specific variables that carry the rank: MPICH/Hydra and PMI-2 set
# PMI_RANK, srun sets SLURM_PROCID, Open MPI its own, PMIx PMIX_RANK.
RANK_VARIABLES = ("PMI_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def rank_from_environment() -> str:
    for name in RANK_VARIABLES:
        value = os.environ.get(name)
        if value is not None and value.isdigit():
            return value
    raise SystemExit(
        f"rank_report: none of {', '.join(RANK_VARIABLES)} is set; run under a launcher"
    )


def main() -> None:
    outdir, pytest_args = sys.argv[1], sys.argv[2:]
    path = os.path.join(outdir, f"rank-{rank_from_environment()}.txt")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    from hpcproc.mpi_init import import_mpi

    import_mpi()
    import pytest

    raise SystemExit(pytest.main(pytest_args))


if __name__ == "__main__":
    main()
