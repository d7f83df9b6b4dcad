"""What the loss of a connection to a node does to a request under way at that moment.

Two nodes of the in-memory transport in this process; the connection between them is
broken with its fault injection at a moment the event loop orders (a task scheduled
just before the request), never by a sleep.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import hpcproc as hp

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
