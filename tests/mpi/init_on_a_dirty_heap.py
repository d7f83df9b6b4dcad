"""Initialise MPI as hpcproc does (``hpcproc.mpi_init.import_mpi``) with a heap full of
random bytes, then print one line per rank.

Usage: ``srun --mpi=pmi2 -N 2 -n 4 python tests/mpi/init_on_a_dirty_heap.py``

MPICH reads 4096 bytes from the UCX worker address it publishes, whatever lies behind
the address on the heap (see ``hpcproc.mpi_init.pad_ucx_address``). Freed random bytes
all over the heap make that junk incompressible: without the pad, MPI_Init fails under
Slurm's pmi2 plugin on every try here.
"""

from __future__ import annotations

import os


def dirty_heap() -> list[bytes]:
    """Leave freed random bytes between live blocks (so they are not merged away), in
    sizes that glibc's malloc serves (pymalloc keeps blocks up to 512 bytes)."""
    blocks = [os.urandom(size) for size in range(600, 6000, 7) for _ in range(3)]
    return blocks[::2]


def main() -> None:
    kept = dirty_heap()
    from hpcproc.mpi_init import import_mpi, padded_ucx_addresses

    mpi = import_mpi()
    mpi.COMM_WORLD.Barrier()
    rank = mpi.COMM_WORLD.Get_rank()
    print(f"initialised rank={rank} padded={padded_ucx_addresses()} kept={len(kept)}", flush=True)


if __name__ == "__main__":
    main()
