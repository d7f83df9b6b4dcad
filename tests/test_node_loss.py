"""What the loss of a connection to a node does to a request under way at that moment.

Two nodes of the in-memory transport in this process; the connection between them is
broken with its fault injection at a moment the event loop orders (a task scheduled
just before the request), never by a sleep.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import hpcproc as hp
from hpcproc.transports.base import ErrorEvent, EventError, EventErrorCode

from ._two_nodes import run_two_nodes

TIMEOUT = 20.0
WAIT = 10.0


async def sleeper() -> None:
    await hp.expect(type(None), timeout=WAIT)


def test_a_spawn_failed_by_a_node_loss_does_not_run_there_later() -> None:
    """A request that the loss failed (``NodeUnreachableError``) must not run on the
    other node afterwards. The control queue used to send it on a new connection
    once its retry had connected: the process ran there, unknown to its caller."""

    async def body(transport: Any, a: hp.Node, b: hp.Node) -> Any:
        before = (await hp.get_node_stats(b.node_id)).processes  # control link open
        old_queue = a.remote._control[b.node_id]
        loop = asyncio.get_running_loop()
        # Runs first, between the spawn's post and the control queue's first send:
        breaking = loop.create_task(
            transport.break_connection(a.node_id.address, b.node_id.address)
        )
        with pytest.raises(hp.NodeUnreachableError):
            await hp.spawn(b.node_id, sleeper)
        await breaking
        assert old_queue.task is not None
        await old_queue.task  # whatever the old queue sends, it has sent
        # On one transport the old queue's sends reach b before this request does:
        after = (await hp.get_node_stats(b.node_id)).processes
        return before, after

    before, after = run_two_nodes(body, TIMEOUT)
    assert after == before


def _raising(real: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
    async def receive() -> Any:
        raise RuntimeError("injected receive failure")

    return receive


def _endpoint_failed(real: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
    calls = 0

    async def receive() -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            return ErrorEvent(EventError(EventErrorCode.ENDPOINT_FAILED, "injected"))
        return await real()

    return receive


@pytest.mark.parametrize(
    ("receive", "logged"),
    [(_raising, "receiving failed"), (_endpoint_failed, "transport failure: injected")],
    ids=["receive-raises", "endpoint-failed-event"],
)
def test_a_node_that_can_receive_nothing_more_closes_loudly(
    receive: Callable[[Callable[[], Awaitable[Any]]], Callable[[], Awaitable[Any]]],
    logged: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An endpoint whose ``receive`` raises what its contract does not (seen: a
    transport bug killed a node's dispatcher, and a 64-rank job hung forever on
    requests nobody answered), or that reports ``ENDPOINT_FAILED`` (it will deliver
    nothing more): the node closes, with a critical log, ``failure`` says why, and a
    request of another node to it fails instead of waiting for ever."""

    async def main() -> None:
        transport = hp.transports.create("inmemory")
        a, b = [await hp.Node(transport).start() for _ in range(2)]
        try:
            endpoint: Any = a._endpoint
            # The dispatcher's next call, once the request below wakes it.
            endpoint.receive = receive(endpoint.receive)

            async def ask() -> Any:
                return await hp.get_node_stats(a.node_id)

            with pytest.raises(hp.NodeUnreachableError):
                await asyncio.wait_for(b.run(ask), WAIT)
            await asyncio.wait_for(a.wait_closed(), WAIT)
            assert a.failure is not None
        finally:
            await a.close()
            await b.close()
            await transport.close()

    with caplog.at_level(logging.CRITICAL, logger="hpcproc"):
        asyncio.run(main())
    assert any(r.levelno == logging.CRITICAL and logged in r.getMessage() for r in caplog.records)
