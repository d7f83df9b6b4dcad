"""In-memory transport specifics (the shared contract is in the conformance suite)."""

from __future__ import annotations

import asyncio
import gc

import numpy as np
import pytest

from hpcproc.transports import create
from hpcproc.transports.base import (
    ConnectError,
    ConnectErrorCode,
    ConnectionOpened,
    EndPointAddress,
    Received,
)
from hpcproc.transports.inmemory import InMemoryTransport

TIMEOUT = 5.0


def test_registry_creates_the_inmemory_transport() -> None:
    assert isinstance(create("inmemory"), InMemoryTransport)


def test_endpoints_of_separate_transports_reach_each_other() -> None:
    async def main() -> None:
        t1, t2 = InMemoryTransport(), InMemoryTransport()
        try:
            a = await t1.new_endpoint()
            b = await t2.new_endpoint()
            conn = await a.connect(b.address)
            await conn.send([b"hello"])
            opened = await asyncio.wait_for(b.receive(), TIMEOUT)
            assert isinstance(opened, ConnectionOpened) and opened.remote_address == a.address
            event = await asyncio.wait_for(b.receive(), TIMEOUT)
            assert isinstance(event, Received) and [bytes(f) for f in event.frames] == [b"hello"]
        finally:
            await t1.close()
            await t2.close()

    asyncio.run(main())


def test_received_frames_do_not_share_memory_with_the_sender() -> None:
    async def main() -> None:
        transport = InMemoryTransport()
        try:
            a = await transport.new_endpoint()
            b = await transport.new_endpoint()
            array = np.ones(4096)
            conn = await a.connect(b.address)
            await conn.send([array.data])
            await asyncio.wait_for(b.receive(), TIMEOUT)
            event = await asyncio.wait_for(b.receive(), TIMEOUT)
            assert isinstance(event, Received)
            assert not np.shares_memory(array, np.asarray(event.frames[0]))
        finally:
            await transport.close()

    asyncio.run(main())


def test_endpoint_dropped_without_close_is_not_found() -> None:
    async def main() -> None:
        client_transport = InMemoryTransport()
        try:
            client = await client_transport.new_endpoint()
            dropped = InMemoryTransport()
            address = (await dropped.new_endpoint()).address
            del dropped
            gc.collect()
            with pytest.raises(ConnectError) as info:
                await client.connect(address)
            assert info.value.code is ConnectErrorCode.NOT_FOUND
        finally:
            await client_transport.close()

    asyncio.run(main())


def test_break_connection_of_a_foreign_endpoint_raises_value_error() -> None:
    async def main() -> None:
        transport = InMemoryTransport()
        try:
            with pytest.raises(ValueError):
                await transport.break_connection(
                    EndPointAddress(b"inmemory:0:0"), EndPointAddress(b"inmemory:0:1")
                )
        finally:
            await transport.close()

    asyncio.run(main())


def test_receive_cancelled_after_wake_up_loses_no_event() -> None:
    async def main() -> None:
        transport = InMemoryTransport()
        try:
            a = await transport.new_endpoint()
            b = await transport.new_endpoint()
            waiters = [asyncio.ensure_future(b.receive()) for _ in range(2)]
            await asyncio.sleep(0)  # both are now parked in receive()
            await a.connect(b.address)  # wakes the first waiter...
            waiters[0].cancel()  # ...which is cancelled before it runs
            event = await asyncio.wait_for(waiters[1], TIMEOUT)
            assert isinstance(event, ConnectionOpened) and event.remote_address == a.address
            assert waiters[0].cancelled()
        finally:
            await transport.close()

    asyncio.run(main())
