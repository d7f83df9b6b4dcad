"""Two nodes of one in-memory transport in this process, for scenarios that need a
remote peer, and its fault injection (``transport.break_connection``), but no other
OS process."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import hpcproc as hp
from hpcproc.transports import create

__all__ = ["run_two_nodes"]


def run_two_nodes(body: Callable[..., Coroutine[Any, Any, Any]], timeout: float) -> Any:
    """Run ``body(transport, a, b)`` as a process on node ``a``; return its result.

    Raises:
        asyncio.TimeoutError: it did not end within ``timeout`` seconds.
    """

    async def main() -> Any:
        transport = create("inmemory")
        a, b = [await hp.Node(transport).start() for _ in range(2)]
        try:
            return await asyncio.wait_for(a.run(body, transport, a, b), timeout)
        finally:
            await a.close()
            await b.close()
            await transport.close()

    return asyncio.run(main())
