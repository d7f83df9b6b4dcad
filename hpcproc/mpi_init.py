"""MPI initialisation as hpcproc does it: the one way anything in hpcproc imports MPI.

Importing mpi4py's ``MPI`` module initialises MPI, and two things have to be in place
before that happens, or MPI (or a transport using UCX in the same process) fails:

* where the ucxx wheel is installed too, its UCX libraries are loaded first
  (:func:`load_ucx_before_mpi`);
* glibc's ``malloc`` returns zeroed memory while ``MPI_Init`` runs (see
  :func:`_zeroed_allocations`), and under Slurm's PMI-1 service its per-thread cache is
  off (:func:`environment_for_mpi_init`; ``python -m hpcproc.run`` restarts itself
  with it).

The mpi transport, the MPI rendezvous, ``python -m hpcproc.run`` (which initialises MPI
before importing the application) and the test suite all call :func:`import_mpi`; a
program that imports mpi4py itself before hpcproc should call it instead. Importing
this module does not import mpi4py.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["environment_for_mpi_init", "import_mpi", "load_ucx_before_mpi"]

log = logging.getLogger("hpcproc.mpi_init")


def import_mpi() -> Any:
    """mpi4py's ``MPI`` module, importing it (which initialises MPI) the way the module
    docstring describes. Idempotent: once MPI is imported, returns it.

    Raises:
        ImportError: mpi4py (or its MPI library) is not installed.
    """
    load_ucx_before_mpi()
    if environment_for_mpi_init(os.environ) is not None:
        log.warning(
            "MPI starts under srun --mpi=pmi2 with glibc's malloc cache on: MPI_Init may fail"
            " on a cut PMI request; set GLIBC_TUNABLES=%s (python -m hpcproc.run does)",
            NO_MALLOC_CACHE,
        )
    try:
        with _zeroed_allocations():
            from mpi4py import MPI  # initialises MPI
    except ImportError as exc:
        raise ImportError(
            "the mpi transport needs mpi4py and an MPI library: pip install hpcproc[mpi]"
        ) from exc
    return MPI


def load_ucx_before_mpi() -> None:
    """Where the ucxx wheel is installed too, load its UCX libraries before MPI.

    The mpich wheel bundles an older UCX (``libucs.so.0``, ``libucp.so.0``). Once MPI
    has loaded it, the ucxx wheel's ``libuct.so`` binds to that ``libucs`` and fails
    with "undefined symbol: ucs_ifname_to_ndev_index", so the ucx transport cannot be
    used in the same process. Loaded the other way round both work (MPICH's UCX netmod
    then runs on the newer UCX). Nothing happens when MPI is already loaded or libucx
    is not installed.
    """
    if "mpi4py.MPI" in sys.modules or importlib.util.find_spec("libucx") is None:
        return
    try:
        importlib.import_module("libucx").load_library()
    except Exception as exc:  # a broken ucxx install must not stop MPI
        log.debug("could not preload libucx: %r", exc)


#: glibc's mallopt parameter: allocations are filled with the complement of its value.
_M_PERTURB = -6

#: The glibc tunable that turns off malloc's per-thread cache (tcache): blocks it holds
#: come back from ``malloc`` as they were freed, without ``M_PERTURB``'s filling.
NO_MALLOC_CACHE = "glibc.malloc.tcache_count=0"


def environment_for_mpi_init(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment this process should be restarted with before MPI initialises,
    or None when the one it has will do.

    Under Slurm's pmi2 plugin (``srun --mpi=pmi2``: ``SLURM_MPI_TYPE=pmi2`` and
    ``PMI_FD`` set), MPICH's put lines must stay within 1024 bytes, and
    :func:`_zeroed_allocations` keeps the uninitialised bytes in them compressible only
    for blocks that do not come from glibc's per-thread cache, which ``mallopt`` cannot
    turn off: it is read from ``GLIBC_TUNABLES`` when the process starts. The
    environment returned adds :data:`NO_MALLOC_CACHE` to it (a setting of
    ``tcache_count`` already there is left as it is, so a restart happens at most once).
    Elsewhere (another PMI, mpiexec, not Linux) None.
    """
    if not sys.platform.startswith("linux"):
        return None
    if environ.get("SLURM_MPI_TYPE") != "pmi2" or "PMI_FD" not in environ:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.tcache_count=" in tunables:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, NO_MALLOC_CACHE) if t)
    return env


@contextlib.contextmanager
def _zeroed_allocations() -> Iterator[None]:
    """While MPI initialises, make glibc's ``malloc`` return zero-filled memory.

    Why: MPICH (the mpich wheel, 5.0) publishes its UCX address through PMI with
    uninitialised bytes in it, hex-encoded with runs of zero bytes compressed. Under
    ``srun --mpi=pmi2`` it speaks PMI-1 to Slurm, whose PMI-1 handler (22.05) reads at
    most 1024 bytes per request: when the garbage (whatever this Python process freed
    last) leaves few zero runs, a put line exceeds that, Slurm truncates it, and
    ``MPI_Init`` fails in ``MPIDI_UCX_comm_addr_exchange``. Measured here: 8 of 8
    ``srun --mpi=pmi2 ... hpcproc.run --transport mpi`` runs failed, 0 of 8 with this.
    Blocks from glibc's per-thread cache escape it (MPICH's own strings, freed while
    it initialises, were seen in a cut line): :func:`environment_for_mpi_init` turns
    that cache off. Does nothing where glibc's ``mallopt`` is unavailable.
    """
    mallopt = None
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            mallopt = ctypes.CDLL(None).mallopt
    if mallopt is not None:
        mallopt(_M_PERTURB, 0xFF)
    try:
        yield
    finally:
        if mallopt is not None:
            mallopt(_M_PERTURB, 0)
