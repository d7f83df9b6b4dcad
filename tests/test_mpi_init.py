"""hpcproc.mpi_init: what has to hold in a process before MPI initialises."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcproc import mpi_init

from ._compiled import compiled_required

#: What MPICH reads from the address (its MPID_MAX_BC_SIZE).
PADDED_SIZE = 4096

ROOT = Path(__file__).parents[1]

needs_pad = pytest.mark.skipif(
    importlib.util.find_spec("hpcproc._ucx_address_pad") is None
    and not compiled_required(),
    reason="hpcproc._ucx_address_pad was not built (no C compiler at install)",
)


@needs_pad
def test_the_pad_is_built_and_in_place() -> None:
    # conftest put it in place before anything loaded MPI; a second call is a no-op.
    assert mpi_init.pad_ucx_address()
    assert mpi_init.pad_ucx_address()
    assert mpi_init.padded_ucx_addresses() is not None


@needs_pad
def test_a_padded_address_is_the_address_then_zeros_up_to_what_mpich_reads() -> None:
    libucxx = pytest.importorskip("ucxx._lib.libucxx", reason="ucxx is not installed")
    assert mpi_init.pad_ucx_address()
    pad = ctypes.CDLL(str(importlib.util.find_spec("hpcproc._ucx_address_pad").origin))
    get = pad.ucp_worker_get_address
    get.restype = ctypes.c_int
    get.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)]
    release = pad.ucp_worker_release_address
    release.restype = None
    release.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    context = libucxx.UCXContext()
    worker = libucxx.UCXWorker(context)
    expected = worker.address.tobytes()  # ucxx's own call: the same bytes
    before = mpi_init.padded_ucx_addresses()
    assert before is not None

    address, length = ctypes.c_void_p(), ctypes.c_size_t()
    assert get(worker.handle, ctypes.byref(address), ctypes.byref(length)) == 0  # UCS_OK
    try:
        assert mpi_init.padded_ucx_addresses() == before + 1
        assert length.value == len(expected) < PADDED_SIZE
        assert address.value is not None
        window = ctypes.string_at(address.value, PADDED_SIZE)
        assert window[: length.value] == expected
        assert window[length.value :] == bytes(PADDED_SIZE - length.value)
    finally:
        release(worker.handle, address)
    del worker, context


@needs_pad
@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="mpi4py is not installed")
def test_mpi_initialised_by_import_mpi_publishes_a_padded_address() -> None:
    """The pad interposes on the real MPI library: MPICH's own UCX worker address,
    asked for while MPI initialises, is a padded one (a singleton MPI here)."""
    script = (
        "from hpcproc.mpi_init import import_mpi, padded_ucx_addresses\n"
        "import_mpi()\n"
        "print('padded', padded_ucx_addresses())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "SLURM_"))}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "padded 1" in done.stdout.splitlines(), (done.stdout, done.stderr)


def test_without_the_pad_nothing_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mpi_init, "_pad_library", None)
    assert mpi_init.padded_ucx_addresses() is None


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"SLURM_MPI_TYPE": "pmi2", "PMI_FD": "11"}, True),
        ({}, False),  # not under Slurm at all
        ({"SLURM_MPI_TYPE": "pmix", "PMIX_RANK": "0"}, False),  # another PMI
        ({"SLURM_MPI_TYPE": "pmi2"}, False),  # no PMI socket: not a task of that step
        ({"PMI_FD": "5", "PMI_RANK": "0"}, False),  # hydra's mpiexec
    ],
)
def test_slurms_pmi1_service_is_recognised(environ: dict[str, str], expected: bool) -> None:
    assert mpi_init._under_slurm_pmi1(environ) is expected
