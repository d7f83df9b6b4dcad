"""Shared pytest fixtures."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcproc.testing.conformance import Harness, TransportSpec

from .transport_specs import SPECS, TLS_DIR


def pytest_configure(config: pytest.Config) -> None:
    """Load UCX's own libraries and the UCX address pad before anything loads MPI
    (pytest-mpi, the mpi tests): see ``hpcproc.mpi_init``. Only when mpi4py is
    installed.
    """
    if importlib.util.find_spec("mpi4py"):
        from hpcproc.mpi_init import load_ucx_before_mpi, pad_ucx_address

        load_ucx_before_mpi()
        pad_ucx_address()


_MARKS = {"ucx": [pytest.mark.ucx]}
# pytest-mpi skips every test with "mpi" among its keywords (parameter ids included)
# unless run under mpiexec with --with-mpi; these run in a single rank.
_IDS = {"mpi": "mpi-singleton"}


def _spec_id(spec: TransportSpec) -> str:
    name = _IDS.get(spec.name, spec.name)
    if spec.options.get("tls"):
        name += "-tls"
    return f"{name}-separate-hosts" if spec.options.get("separate_hosts") else name


@pytest.fixture(scope="session")
def job_certificates() -> Iterator[Path]:
    """A throw-away CA and node certificates (``python -m hpcproc.tls init``) at
    ``transport_specs.TLS_DIR``, removed after the session."""
    pytest.importorskip("cryptography", reason="pip install hpcproc[tls] to make certificates")
    from hpcproc.tls import init_directory

    shutil.rmtree(TLS_DIR, ignore_errors=True)
    init_directory(TLS_DIR)
    try:
        yield TLS_DIR
    finally:
        shutil.rmtree(TLS_DIR, ignore_errors=True)


@pytest.fixture(
    params=[pytest.param(s, id=_spec_id(s), marks=_MARKS.get(s.name, [])) for s in SPECS]
)
def harness(request: pytest.FixtureRequest) -> Harness:
    """A conformance :class:`Harness` for each transport of ``tests/transport_specs.py``.

    Skips, with the reason, a transport whose module or optional library is missing.
    """
    spec: TransportSpec = request.param
    reason = spec.unavailable()
    if reason is not None:
        pytest.skip(reason)
    if spec.options.get("tls"):
        request.getfixturevalue("job_certificates")
    return Harness(spec)
