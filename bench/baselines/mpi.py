"""mpi4py ping-pong under ``mpiexec -n 2``: buffer ``Send``/``Recv``, pickle
``send``/``recv``, and the floor of a Python asyncio transport over mpi4py.

Both ranks follow the same plan (rank 1 echoes a known number of messages per size),
so no header is needed. mpi4py is imported only here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from .._pair import Peer
from .._timing import Step, atime_steps, echo_counts, time_steps


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


#: kind flags pad nframes src_ep dst_ep gen conn_id length: hpcproc's one-frame envelope.
_FLOOR_ENVELOPE = "<BBHIIIQQQ"


async def asyncio_floor_role(peer: Peer) -> dict[str, list[float]] | None:
    """The least an asyncio transport written in Python can do over mpi4py.

    Not a transport: the same ping-pong as ``bench.transport:hpcproc_role`` (an
    ``async`` send, an ``async`` receive that spins on MPI, an event object per
    message, the same ``isinstance`` dispatch in the echo), making the MPI calls
    hpcproc's mpi transport makes for a small message (``Isend`` + ``Test`` of the
    envelope and frame joined; ``Improbe``, ``Get_count``, ``Recv``), and one lock and
    one link lookup per message, but none of the transport's other bookkeeping
    (generations, connection states, ordering of multi-message frames, fairness to the
    event loop). It measures what Python and asyncio cost on top of raw mpi4py, so
    that the transport's ratio to raw mpi4py can be read against the ratio this floor
    reaches. Round-trip sizes only (it copies the payload into each message).
    """
    import struct
    import threading

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    other = 1 - rank
    envelope = struct.Struct(_FLOOR_ENVELOPE)
    status = MPI.Status()
    byte, any_source = MPI.BYTE, MPI.ANY_SOURCE
    lock = threading.RLock()
    links = {(other, 1): 7}
    pending: list[Any] = []
    queue: list[_FloorEvent] = []

    async def send(frames: list[memoryview]) -> None:
        view = frames[0]
        data = envelope.pack(2, 1, 0, 1, 1, 1, 1, 7, view.nbytes) + view
        with lock:
            request = comm.Isend(data, other, 3)
            if not request.Test():
                pending.append(request)

    async def receive() -> _FloorEvent:
        while not queue:
            with lock:
                message = comm.Improbe(any_source, 3, status)
                if message is None:
                    continue
                src = status.Get_source()
                buf = bytearray(status.Get_count(byte))
                message.Recv([buf, byte])
            fields = envelope.unpack_from(buf)
            queue.append(_FloorEvent(links[(src, fields[4])], [memoryview(buf)[envelope.size :]]))
        return queue.pop()

    steps = [Step(**s) for s in peer.params["steps"] if s["size"] <= _FLOOR_MAX]
    if rank == 1:
        for _, rounds in echo_counts(steps):
            for _ in range(rounds):
                event = await receive()
                if isinstance(event, _FloorEvent):
                    await send(event.frames)
                del event
        MPI.Request.Waitall(pending)
        return None

    def prepare(size: int) -> Callable[[], Awaitable[None]]:
        frames = [memoryview(np.ones(size, dtype=np.uint8))]  # type: ignore[arg-type]

        async def one() -> None:
            await send(frames)
            await receive()

        return one

    result = await atime_steps(steps, prepare, peer.turn)
    MPI.Request.Waitall(pending)
    return result


#: The largest size the floor measures (the transport's round-trip sizes).
_FLOOR_MAX = 32768


class _FloorEvent:
    __slots__ = ("conn_id", "frames")

    def __init__(self, conn_id: int, frames: list[memoryview]) -> None:
        self.conn_id = conn_id
        self.frames = frames
