"""How each transport is tested: one :class:`TransportSpec` per transport.

Each transport's engineer owns its entry: factory options, the environment it needs,
what it supports, and scenario sizes (see :class:`hpcproc.testing.conformance.
TransportSpec` for every field). A transport whose module does not exist yet, or whose
optional library is missing, is skipped with the reason; once its module lands the
suite runs against it unchanged:

    .venv/bin/pytest tests/test_transport_conformance.py -k tcp
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hpcproc.testing.conformance import TransportSpec

__all__ = ["SPECS", "TLS_DIR"]

#: Where the session fixture ``job_certificates`` (conftest.py) writes a throw-away CA
#: and node certificates for the TLS spec (``python -m hpcproc.tls init``'s layout).
TLS_DIR = Path(tempfile.gettempdir()) / f"hpcproc-test-tls-{os.getpid()}"

SPECS: list[TransportSpec] = [
    TransportSpec(
        "inmemory",
        two_process_reason="in-memory endpoints live in one process by definition",
    ),
    TransportSpec(
        "tcp",
        two_process=True,
    ),
    # tcp over mutual TLS: every link runs TLS 1.3, the cookie handshake inside it.
    TransportSpec(
        "tcp",
        options={"tls": True},
        env={"HPCPROC_TLS_DIR": str(TLS_DIR)},
        two_process=True,
    ),
    TransportSpec(
        "shm",
        two_process=True,
    ),
    TransportSpec(
        "mpi",
        requires=("mpi4py",),
        # One rank (a singleton MPI init) with several endpoints, of one or several
        # transports (they share the process's MPI engine); two OS processes need
        # mpiexec: tests/test_mpi_two_ranks.py runs these scenarios across two ranks.
        two_process_reason="a singleton MPI rank cannot reach another; see test_mpi_two_ranks.py",
    ),
    TransportSpec(
        "teststreams",
        # The transport written to base.py's abstract methods only, installed as its own
        # distribution (tests/plugin_transport, by `make venv`) and found through its
        # entry point: the contract is all the layers above need. No fault injection.
        requires=("hpcproc_teststreams",),
        two_process=True,
    ),
    TransportSpec(
        "ucx",
        requires=("ucxx",),
        # UCX needs a socket-capable transport for listener connections.
        env={"UCX_TLS": "tcp,sm,self"},
        two_process=True,
    ),
    # The routing transport: endpoints of one test run on one host, so connections
    # go over shm; with separate_hosts every endpoint counts as a host of its own and
    # they go over tcp. Both paths must meet the contract.
    TransportSpec(
        "shm+tcp",
        two_process=True,
    ),
    TransportSpec(
        "shm+tcp",
        options={"separate_hosts": True},
        two_process=True,
    ),
]
