"""``receive_nowait`` beside a task waiting in ``receive`` (how a waiting process takes
its own reply): events come out once each, in order, whoever takes them, and the close
is reported by ``receive`` only."""

from __future__ import annotations

import asyncio
import importlib.util
import os
from typing import Any

import pytest

from hpcproc.transports import (
    ConnectionClosed,
    ConnectionOpened,
    EndPointClosed,
    Received,
    create,
)
from hpcproc.transports.base import EndPointClosedError

TRANSPORTS = [
    "inmemory",
    "tcp",
    "shm",
    "shm+tcp",  # routing: both endpoints on this host, so over its shm sub-endpoint
    # A singleton MPI (not the id "mpi": pytest-mpi skips that keyword outside mpiexec).
    pytest.param(
        "mpi",
        id="mpi-singleton",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("mpi4py") is None, reason="mpi4py is not installed"
        ),
    ),
    pytest.param(
        "ucx",
        marks=[
            pytest.mark.ucx,
            pytest.mark.skipif(
                importlib.util.find_spec("ucxx") is None, reason="ucxx is not installed"
            ),
        ],
    ),
    # base.py's default receive_nowait (nothing at once): the same promises hold.
    pytest.param(
        "teststreams",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("hpcproc_teststreams") is None,
            reason="teststreams: the test transport's distribution is not installed"
            " (make venv installs tests/plugin_transport)",
        ),
    ),
]


@pytest.fixture(autouse=True)
def _cookie(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCPROC_COOKIE", os.environ.get("HPCPROC_COOKIE") or "0" * 32)


async def _pair(name: str) -> tuple[Any, Any, Any, Any, ConnectionOpened]:
    transport = create(name)
    a = await transport.new_endpoint()
    b = await transport.new_endpoint()
    conn = await a.connect(b.address)
    opened = await asyncio.wait_for(b.receive(), 10)
    assert isinstance(opened, ConnectionOpened)
    return transport, a, b, conn, opened


@pytest.mark.parametrize("name", TRANSPORTS)
def test_events_taken_by_both_consumers_come_out_once_in_order(name: str) -> None:
    async def main() -> None:
        transport, _, b, conn, _ = await _pair(name)
        taken: list[int] = []

        async def waiter() -> None:
            while True:
                event = await b.receive()
                if isinstance(event, Received):
                    taken.append(int(bytes(event.frames[0])))
                elif isinstance(event, EndPointClosed):
                    return

        task = asyncio.ensure_future(waiter())
        await asyncio.sleep(0)  # the waiter now waits in receive
        count = 400
        for i in range(count):
            await conn.send([str(i).encode()])
            if i % 3 == 0:
                # Take what is there (or polls in); the waiter must not see it too.
                for _ in range(50):
                    event = b.receive_nowait()
                    if event is None:
                        await asyncio.sleep(0)
                        continue
                    assert not isinstance(event, EndPointClosed)
                    if isinstance(event, Received):
                        taken.append(int(bytes(event.frames[0])))
                    break
        while len(taken) < count:
            await asyncio.sleep(0.001)  # bounded by the wait_for below
        # Both consumers record an event the moment they take it: one sequence, the
        # order sent, nothing twice.
        assert taken == list(range(count))
        assert b.receive_nowait() is None
        await transport.close()
        await asyncio.wait_for(task, 10)
        assert b.receive_nowait() is None  # the close is receive's to report
        with pytest.raises(EndPointClosedError):
            await b.receive()

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize("name", TRANSPORTS)
def test_data_handed_to_a_receiver_keeps_its_place_among_queued_events(name: str) -> None:
    """``set_receiver``: a transport may refuse it; one that accepts hands data over only
    while no event is queued, so every message, whichever way it came, is seen in the
    order sent; and it forgets the receiver when the connection closes."""

    async def main() -> None:
        transport, a, b, conn, opened = await _pair(name)
        opened_id = opened.conn_id
        seen: list[int] = []
        handed = 0

        def receiver(frames: Any) -> None:
            nonlocal handed
            handed += 1
            seen.append(int(bytes(frames[0])))

        accepted = b.set_receiver(opened_id, receiver)
        count = 200
        for i in range(count):
            if i == count // 2:
                # B queues this connection's ConnectionOpened, and nothing takes it
                # until every message was sent: the rest must queue behind it.
                second = await a.connect(b.address)
            await conn.send([str(i).encode()])
        queued = 0
        while len(seen) < count:
            event = await asyncio.wait_for(b.receive(), 10)
            if isinstance(event, Received):
                queued += 1
                seen.append(int(bytes(event.frames[0])))
        assert seen == list(range(count))
        if accepted:
            # Nothing was queued ahead of the first half: it went to the receiver.
            assert (handed, queued) == (count // 2, count // 2)
        else:
            assert handed == 0
        await conn.close()
        await second.close()
        closed = 0
        while closed < 2:
            event = await asyncio.wait_for(b.receive(), 10)
            closed += isinstance(event, ConnectionClosed)
        assert not b.set_receiver(opened_id, receiver)  # closed: nothing to hand over
        await transport.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_routing_sub_endpoint_that_fails_fails_every_later_receive() -> None:
    """A sub-endpoint whose ``receive`` raises (a bug below): the routing endpoint's
    ``receive`` raises that error on every call, not once and then waits for ever
    (its pump for that sub-endpoint is gone)."""

    async def scenario() -> None:
        transport, _a, b, conn, _opened = await _pair("shm+tcp")
        try:
            local = b.sub_endpoints[0]

            async def broken() -> Any:
                raise RuntimeError("injected sub-endpoint failure")

            local.receive = broken  # the shm pump's next call
            # Data wakes a pump already waiting in the real receive: it then calls the
            # broken one. The message itself comes out first, or is taken by
            # receive_nowait, which polls the sub-endpoint directly.
            await asyncio.wait_for(conn.send([b"wake"]), 10)
            first = None
            with pytest.raises(RuntimeError, match="injected sub-endpoint failure"):
                while True:
                    first = await asyncio.wait_for(b.receive(), 10)
                    assert isinstance(first, Received), first
            with pytest.raises(RuntimeError, match="injected sub-endpoint failure"):
                await asyncio.wait_for(b.receive(), 10)
        finally:
            await asyncio.wait_for(transport.close(), 10)

    asyncio.run(scenario())
