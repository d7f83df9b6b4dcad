"""Shared pytest fixtures."""

from __future__ import annotations

import importlib
import importlib.util

import pytest

from hpcproc.testing.conformance import Harness, TransportSpec

from .transport_specs import SPECS


def pytest_configure(config: pytest.Config) -> None:
    """Load UCX's own libraries before anything loads MPI.

    The mpich wheel bundles an older UCX (``libucs.so.0``, ``libucp.so.0``). Once
    mpi4py has loaded it, the ucxx wheel's ``libuct.so`` binds to that ``libucs`` and
    fails with "undefined symbol: ucs_ifname_to_ndev_index", so every ucx test after
    an mpi test in the same pytest process fails. Loaded the other way round, both work
    (mpich's netmod then uses the newer UCX). Only when both are installed.
    """
    if importlib.util.find_spec("libucx") and importlib.util.find_spec("mpi4py"):
        importlib.import_module("libucx").load_library()


_MARKS = {"ucx": [pytest.mark.ucx]}
# pytest-mpi skips every test with "mpi" among its keywords (parameter ids included)
# unless run under mpiexec with --with-mpi; these run in a single rank.
_IDS = {"mpi": "mpi-singleton"}


@pytest.fixture(
    params=[
        pytest.param(s, id=_IDS.get(s.name, s.name), marks=_MARKS.get(s.name, [])) for s in SPECS
    ]
)
def harness(request: pytest.FixtureRequest) -> Harness:
    """A conformance :class:`Harness` for each transport of ``tests/transport_specs.py``.

    Skips, with the reason, a transport whose module or optional library is missing.
    """
    spec: TransportSpec = request.param
    reason = spec.unavailable()
    if reason is not None:
        pytest.skip(reason)
    return Harness(spec)
