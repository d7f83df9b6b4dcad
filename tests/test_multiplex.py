"""The multiplexing core shared by the transports (hpcproc.transports._multiplex):
what no single transport's suite pins down."""

from __future__ import annotations

import asyncio
import sys

import pytest

from hpcproc.transports._multiplex import Link, MultiplexedEndPoint
from hpcproc.transports.base import ConnectError, ConnectErrorCode, EndPointAddress

TIMEOUT = 10.0


class _AnsweringLate(MultiplexedEndPoint):
    """Its links open only when the test answers, and then fail with the transport's
    own error (as a dial whose request the transport cancelled)."""

    def __init__(self) -> None:
        super().__init__(EndPointAddress(b"late:1"))
        self.answer: asyncio.Future[None] | None = None

    async def _open_link(self, remote: EndPointAddress, timeout: float | None) -> Link:
        self.answer = asyncio.get_running_loop().create_future()
        await asyncio.wait_for(self.answer, TIMEOUT)
        raise ConnectError(ConnectErrorCode.FAILED, "request canceled by the transport")

    async def _release(self) -> None:
        pass


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Task.cancelling is Python 3.11+")
def test_a_stopped_establishment_ends_cancelled_though_the_transport_failed_first() -> None:
    """asyncio.wait_for returns the inner result when it and the cancellation race; the
    link's establishment must still end cancelled, not with an error that nobody waits
    for (asyncio.run reports those: "unhandled exception during asyncio.run() shutdown")."""

    async def body() -> None:
        endpoint = _AnsweringLate()
        remote = EndPointAddress(b"late:2")
        caller = asyncio.ensure_future(endpoint.connect(remote))
        while endpoint.answer is None:
            await asyncio.sleep(0)
        task = endpoint._pending[remote].task
        endpoint.answer.set_result(None)  # the transport answers,
        task.cancel()  # and in the same turn the establishment is told to stop
        await asyncio.wait([task], timeout=TIMEOUT)
        assert task.cancelled()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await endpoint.close()

    asyncio.run(asyncio.wait_for(body(), TIMEOUT))


def test_an_establishment_that_fails_on_its_own_still_reports_the_transports_error() -> None:
    async def body() -> None:
        endpoint = _AnsweringLate()
        caller = asyncio.ensure_future(endpoint.connect(EndPointAddress(b"late:2")))
        while endpoint.answer is None:
            await asyncio.sleep(0)
        endpoint.answer.set_result(None)
        with pytest.raises(ConnectError, match="request canceled by the transport"):
            await caller
        await endpoint.close()

    asyncio.run(asyncio.wait_for(body(), TIMEOUT))
