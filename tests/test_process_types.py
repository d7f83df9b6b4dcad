"""Typed API at run time (issue 12, point 5); the static side is tests/typed_program.py,
which mypy checks in ``make lint``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import hpcproc as hp
import hpcproc.run

from . import typed_program
from .test_process_cluster import WAIT, Cluster, Servers, kind, run_cluster, servers

__all__ = ["kind", "servers"]


async def int_channel_owner(reply: hp.Pid) -> None:
    send_port, receive_port = hp.new_chan(int)
    await hp.send(reply, send_port)
    got = await hp.receive_chan(receive_port, timeout=WAIT)
    await hp.send(reply, ("got", got))


def test_typed_program_runs() -> None:
    assert typed_program.run() == (9.0, 4.0, None)


def test_typed_channel_refuses_a_message_of_another_type_at_the_sender(
    kind: str, servers: Servers
) -> None:
    async def body(c: Cluster) -> Any:
        await hp.spawn(c.b, int_channel_owner, hp.self_pid())
        port = await hp.expect(hp.SendPort, timeout=WAIT)
        refused = ""
        try:
            await hp.send_chan(port, "forty-two")
        except TypeError as exc:
            refused = str(exc)
        await hp.send_chan(port, 42)
        return refused, await hp.expect(tuple, timeout=WAIT)

    refused, got = run_cluster(kind, servers, body)
    assert "channel of int" in refused and "str" in refused
    assert got == ("got", 42)


def test_local_typed_channel_checks_too() -> None:
    async def body() -> Any:
        send_port, receive_port = hp.new_chan(bytes)
        with pytest.raises(TypeError, match="channel of bytes cannot carry int"):
            await hp.send_chan(send_port, 1)  # type: ignore[arg-type]
        await hp.send_chan(send_port, b"ok")
        return await hp.receive_chan(receive_port, timeout=WAIT)

    async def main() -> Any:
        transport = hp.transports.create("inmemory")
        async with hp.Node(transport) as node:
            result = await node.run(body)
        await transport.close()
        return result

    assert asyncio.run(main()) == b"ok"


def test_new_chan_refuses_what_is_not_a_class() -> None:
    async def body() -> Any:
        with pytest.raises(TypeError, match="needs a class"):
            hp.new_chan(3)  # type: ignore[call-overload]

    async def main() -> Any:
        transport = hp.transports.create("inmemory")
        async with hp.Node(transport) as node:
            await node.run(body)
        await transport.close()

    asyncio.run(main())


def test_cluster_type_is_exported() -> None:
    assert hp.Cluster is hpcproc.run.Cluster
    assert "Cluster" in hp.__all__
