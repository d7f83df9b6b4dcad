"""ucxx ping-pong with its asyncio API (``create_listener``, ``create_endpoint``,
``ep.send``, ``ep.recv``); run it with ``UCX_TLS=tcp,sm,self``.

Both roles follow the same plan, so each ``recv`` knows its size. ucxx is imported
only here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import numpy as np

from .._pair import Peer
from .._timing import Step, atime_steps, echo_counts


async def role(peer: Peer) -> dict[str, list[float]] | None:
    """Role 1 listens and echoes; role 0 connects and times the plan."""
    import ucxx

    steps = [Step(**s) for s in peer.params["steps"]]
    if peer.role == 1:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def serve(ep: object) -> None:
            try:
                for size, rounds in echo_counts(steps):
                    buf = np.empty(size, dtype=np.uint8)
                    for _ in range(rounds):
                        await ep.recv(buf)  # type: ignore[attr-defined]
                        await ep.send(buf)  # type: ignore[attr-defined]
                # A send completes before the peer has the data: closing now could
                # reset the connection under the last reply. Wait for the peer's bye
                # (or its close: it had every reply by then).
                with contextlib.suppress(Exception):
                    await ep.recv(np.empty(1, dtype=np.uint8))  # type: ignore[attr-defined]
                await ep.close()  # type: ignore[attr-defined]
            finally:
                if not done.done():
                    done.set_result(None)

        listener = ucxx.create_listener(serve)
        peer.publish("port", listener.port)
        await asyncio.wait_for(done, 600)
        listener.close()
        return None

    port = await peer.alookup("port")
    ep = await ucxx.create_endpoint("127.0.0.1", port)

    def prepare(size: int) -> Callable[[], Awaitable[None]]:
        payload = np.ones(size, dtype=np.uint8)
        rbuf = np.empty(size, dtype=np.uint8)

        async def one() -> None:
            await ep.send(payload)
            await ep.recv(rbuf)

        return one

    result = await atime_steps(steps, prepare, peer.turn)
    await ep.send(np.zeros(1, dtype=np.uint8))  # bye: the echo closes once it has it
    await ep.close()
    return result
