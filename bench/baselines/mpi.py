"""mpi4py ping-pong under ``mpiexec -n 2``: buffer ``Send``/``Recv`` and pickle ``send``/``recv``.

Both ranks follow the same plan (rank 1 echoes a known number of messages per size),
so no header is needed. mpi4py is imported only here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .._pair import Peer
from .._timing import Step, echo_counts, time_steps


def buffer_role(peer: Peer) -> dict[str, list[float]] | None:
    """``Comm.Send`` / ``Comm.Recv`` on preallocated numpy buffers."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    steps = [Step(**s) for s in peer.params["steps"]]
    if comm.Get_rank() == 1:
        for size, rounds in echo_counts(steps):
            buf = np.empty(size, dtype=np.uint8)
            for _ in range(rounds):
                comm.Recv(buf, source=0, tag=1)
                comm.Send(buf, dest=0, tag=2)
        return None

    def prepare(size: int) -> Callable[[], None]:
        payload = np.ones(size, dtype=np.uint8)
        rbuf = np.empty(size, dtype=np.uint8)

        def one() -> None:
            comm.Send(payload, dest=1, tag=1)
            comm.Recv(rbuf, source=1, tag=2)

        return one

    return time_steps(steps, prepare, peer.turn)


def pickle_role(peer: Peer) -> dict[str, list[float]] | None:
    """``comm.send`` / ``comm.recv`` of a ``bytes`` payload (pickled by mpi4py)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    steps = [Step(**s) for s in peer.params["steps"]]
    if comm.Get_rank() == 1:
        for _, rounds in echo_counts(steps):
            for _ in range(rounds):
                comm.send(comm.recv(source=0, tag=1), dest=0, tag=2)
        return None

    def prepare(size: int) -> Callable[[], None]:
        payload = bytes(size)

        def one() -> None:
            comm.send(payload, dest=1, tag=1)
            comm.recv(source=1, tag=2)

        return one

    return time_steps(steps, prepare, peer.turn)
