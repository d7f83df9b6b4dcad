"""hpcproc.mpi_init: what has to hold in a process before MPI initialises."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hpcproc.mpi_init import NO_MALLOC_CACHE, environment_for_mpi_init

SLURM_PMI2 = {"SLURM_MPI_TYPE": "pmi2", "PMI_FD": "11", "PATH": "/usr/bin"}

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc's malloc tunables are Linux's"
)


@linux_only
def test_under_slurm_pmi2_the_restart_environment_turns_the_malloc_cache_off() -> None:
    env = environment_for_mpi_init(SLURM_PMI2)
    assert env == {**SLURM_PMI2, "GLIBC_TUNABLES": NO_MALLOC_CACHE}


@linux_only
def test_tunables_already_set_are_kept_and_the_cache_setting_added() -> None:
    env = environment_for_mpi_init({**SLURM_PMI2, "GLIBC_TUNABLES": "glibc.malloc.mxfast=0"})
    assert env is not None
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.mxfast=0:{NO_MALLOC_CACHE}"


@linux_only
def test_a_restarted_process_or_a_users_cache_setting_is_not_restarted_again() -> None:
    assert environment_for_mpi_init({**SLURM_PMI2, "GLIBC_TUNABLES": NO_MALLOC_CACHE}) is None
    user = {**SLURM_PMI2, "GLIBC_TUNABLES": "glibc.malloc.tcache_count=3"}
    assert environment_for_mpi_init(user) is None


@pytest.mark.parametrize(
    "environ",
    [
        {},  # not under Slurm at all
        {"SLURM_MPI_TYPE": "pmix", "PMIX_RANK": "0"},  # another PMI
        {"SLURM_MPI_TYPE": "pmi2"},  # no PMI socket: not a task of that step
        {"PMI_FD": "5", "PMI_RANK": "0"},  # hydra's mpiexec
    ],
)
def test_elsewhere_no_restart_is_needed(environ: dict[str, str]) -> None:
    assert environment_for_mpi_init(environ) is None


_FREED_THEN_ALLOCATED = textwrap.dedent(
    """
    import ctypes
    from hpcproc.mpi_init import _zeroed_allocations

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    with _zeroed_allocations():
        block = libc.malloc(200)
        ctypes.memset(block, ord("x"), 200)
        libc.free(block)
        again = libc.malloc(200)
        # The first 16 bytes held the allocator's own links while the block was free.
        print(ctypes.string_at(again + 16, 184).strip(b"\\0") or b"zeroed")
    """
)


def _freed_then_allocated(tunables: str) -> str:
    env = {"GLIBC_TUNABLES": tunables, "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", _FREED_THEN_ALLOCATED],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


@linux_only
def test_with_the_cache_off_a_block_freed_while_mpi_initialises_comes_back_zeroed() -> None:
    assert _freed_then_allocated(NO_MALLOC_CACHE) == "b'zeroed'"


@linux_only
def test_with_the_cache_on_the_freed_bytes_come_back_which_is_why_it_is_turned_off() -> None:
    # What the restart exists for: mallopt's filling misses the per-thread cache.
    assert _freed_then_allocated("") == "b'" + "x" * 184 + "'"
