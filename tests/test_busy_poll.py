"""The idle poller of ``EndPoint.receive`` (hpcproc.transports._busy_poll)."""

from __future__ import annotations

import asyncio

import pytest

from hpcproc.transports._busy_poll import IdlePoller
from hpcproc.transports._multiplex import EventQueue
from hpcproc.transports.base import ConnectionClosed

TIMEOUT = 10.0


def _run(body: object) -> None:
    asyncio.run(asyncio.wait_for(body, TIMEOUT))  # type: ignore[arg-type]


def test_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="busy_poll_us"):
        IdlePoller(asyncio.new_event_loop(), -1)


def test_poll_finds_an_event_without_sleeping() -> None:
    async def body() -> None:
        events = EventQueue()
        calls = 0

        def poll_once() -> bool:
            nonlocal calls
            calls += 1
            if calls == 3:
                events.put(ConnectionClosed(7))
            return True

        poller = IdlePoller(asyncio.get_running_loop(), 1e6)  # long enough never to give up
        assert await poller.receive(events, poll_once) == ConnectionClosed(7)
        assert calls == 3

    _run(body())


def test_queued_event_is_returned_without_polling() -> None:
    async def body() -> None:
        events = EventQueue()
        events.put(ConnectionClosed(1))
        polled: list[int] = []
        poller = IdlePoller(asyncio.get_running_loop(), 1e6)
        assert await poller.receive(events, lambda: bool(polled.append(1)) or True) == (
            ConnectionClosed(1)
        )
        assert polled == []

    _run(body())


def test_disabled_or_nothing_to_poll_waits_on_the_loop() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        for max_us, has_links in ((0.0, True), (1e6, False)):
            events = EventQueue()
            calls = 0

            def poll_once(has_links: bool = has_links) -> bool:
                nonlocal calls
                calls += 1
                return has_links

            loop.call_later(0.01, events.put, ConnectionClosed(2))
            assert await IdlePoller(loop, max_us).receive(events, poll_once) == (
                ConnectionClosed(2)
            )
            assert calls == (0 if max_us == 0 else 1)

    _run(body())


def test_other_ready_callbacks_run_before_polling() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        events = EventQueue()
        order: list[str] = []
        loop.call_soon(order.append, "ready callback")

        def poll_once() -> bool:
            order.append("poll")
            events.put(ConnectionClosed(3))
            return True

        await IdlePoller(loop, 1e6).receive(events, poll_once)
        assert order == ["ready callback", "poll"]

    _run(body())
