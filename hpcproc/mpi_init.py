"""MPI initialisation as hpcproc does it: the one way anything in hpcproc imports MPI.

Importing mpi4py's ``MPI`` module initialises MPI, and two things have to be in place
before that happens, or MPI (or a transport using UCX in the same process) fails:

* where the ucxx wheel is installed too, its UCX libraries are loaded first
  (:func:`load_ucx_before_mpi`);
* the UCX worker address MPICH publishes has 4096 zero-padded bytes behind it
  (:func:`pad_ucx_address`): MPICH reads that many.

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

__all__ = ["import_mpi", "load_ucx_before_mpi", "pad_ucx_address", "padded_ucx_addresses"]

log = logging.getLogger("hpcproc.mpi_init")

#: The compiled part that pads the address (``hpcproc/_ucx_address_pad.c``).
_PAD_MODULE = "hpcproc._ucx_address_pad"

_pad_library: ctypes.CDLL | None = None


def import_mpi() -> Any:
    """mpi4py's ``MPI`` module, importing it (which initialises MPI) the way the module
    docstring describes. Idempotent: once MPI is imported, returns it.

    Raises:
        ImportError: mpi4py (or its MPI library) is not installed.
    """
    load_ucx_before_mpi()
    padded = pad_ucx_address()
    if not padded and "mpi4py.MPI" not in sys.modules and _under_slurm_pmi1(os.environ):
        log.warning(
            "%s was not built (no C compiler at install): MPI_Init under srun --mpi=pmi2"
            " may fail on a cut PMI request (see hpcproc.mpi_init.pad_ucx_address)",
            _PAD_MODULE,
        )
    try:
        # Without the pad, zero-filled allocations make the junk MPICH reads
        # compressible more often than not (the fallback, not a fix).
        with contextlib.nullcontext() if padded else _zeroed_allocations():
            from mpi4py import MPI  # initialises MPI
    except ImportError as exc:
        raise ImportError(
            "the mpi transport needs mpi4py and an MPI library: pip install hpcproc[mpi]"
        ) from exc
    return MPI


def pad_ucx_address() -> bool:
    """Make every UCX worker address in this process have 4096 readable bytes, the
    address then zeros; True when that is in place (or already was), False where the
    compiled part was not built or cannot be loaded (not Linux, no C compiler at install).

    Why: MPICH 5.0's UCX netmod publishes its worker address through PMI by reading 4096
    bytes (``MPID_MAX_BC_SIZE``) from the buffer ``ucp_worker_get_address`` returned,
    whatever the address's length (176 bytes here), so it publishes whatever lies behind
    the buffer on the heap: live Python objects, freed text (this process's docstrings
    were seen in Slurm's log). Besides leaking this process's memory to every rank, under
    ``srun --mpi=pmi2`` that breaks ``MPI_Init``: MPICH's hex encoding compresses only
    runs of zeros, Slurm 22.05 reads at most 1024 bytes of each PMI-1 request, and a put
    line with junk in it is cut ("mpi/pmi2: value not properly terminated in client
    request", then ``MPIDI_UCX_comm_addr_exchange`` fails). Measured here, 2 hosts x 2
    ranks with a heap full of random bytes: MPI_Init failed 2 of 2 times without the
    pad (malloc zero-filling and its cache off did not help), 0 of 3 with it.

    How: a small library loaded ``RTLD_GLOBAL`` before MPI, whose
    ``ucp_worker_get_address`` / ``ucp_worker_release_address`` interpose on libucp's and
    hand out a zero-padded copy of the address (same bytes and length for every other
    caller). Must run before MPI is loaded; :func:`import_mpi` calls it.
    """
    global _pad_library
    if _pad_library is not None:
        return True
    if not sys.platform.startswith("linux"):
        return False
    spec = importlib.util.find_spec(_PAD_MODULE)
    if spec is None or spec.origin is None:
        return False
    try:
        library = ctypes.CDLL(spec.origin, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        log.debug("could not load %s: %r", spec.origin, exc)
        return False
    library.hpcproc_padded_addresses.restype = ctypes.c_ulong
    library.hpcproc_padded_addresses.argtypes = []
    _pad_library = library
    return True


def padded_ucx_addresses() -> int | None:
    """How many padded UCX worker addresses this process has handed out (MPICH asks
    for one when it initialises), or None when :func:`pad_ucx_address` has not put the
    pad in place."""
    if _pad_library is None:
        return None
    return int(_pad_library.hpcproc_padded_addresses())


def _under_slurm_pmi1(environ: Mapping[str, str]) -> bool:
    """Whether MPI would start under Slurm's pmi2 plugin (``srun --mpi=pmi2``), where
    MPICH speaks PMI-1 to Slurm."""
    return environ.get("SLURM_MPI_TYPE") == "pmi2" and "PMI_FD" in environ


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


@contextlib.contextmanager
def _zeroed_allocations() -> Iterator[None]:
    """While MPI initialises, make glibc's ``malloc`` return zero-filled memory: the
    fallback where :func:`pad_ucx_address` is not available.

    What lies behind MPICH's UCX address on the heap (see :func:`pad_ucx_address`) is
    then zeros more often: blocks allocated while MPI initialises are, blocks allocated
    before it and freed ones are not. An earlier measurement: 8 of 8 ``srun
    --mpi=pmi2 ... hpcproc.run --transport mpi`` runs failed without it, 0 of 8 with it;
    CI still saw it fail. Does nothing where glibc's ``mallopt`` is unavailable.
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
