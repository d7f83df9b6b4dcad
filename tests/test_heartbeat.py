"""Heartbeats: an idle link stays up, a hung peer is lost, the tick is validated.

The transports with heartbeats (tcp, shm, ucx) send a ``TICK`` on a link idle for a
tick and fail a link on which nothing arrived for 4 ticks (``_multiplex``'s module
docstring). A hung peer is made real: a node server in another OS process stopped with
``SIGSTOP`` (its sockets stay open, nothing closes, so only the heartbeat can tell).
Detection is asserted within a generous bound (30 ticks), never a tight threshold.
The partition tests on the multi-host cluster are in ``test_partition.py``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from hpcproc.testing.node_server import NodeServerProcess
from hpcproc.transports import create
from hpcproc.transports._multiplex import DEFAULT_TICK, TICKS_TO_LOSS, tick_period
from hpcproc.transports.base import (
    ConnectionOpened,
    ErrorEvent,
    EventErrorCode,
    Received,
)

ROOT = Path(__file__).resolve().parent.parent
COOKIE = "hpcproc-heartbeat-tests"
TICK = 0.2
BOUND = 30 * TICK + 10.0

KINDS = ["tcp", "shm", "ucx"]


def _options(kind: str) -> dict[str, Any]:
    if kind == "ucx" and importlib.util.find_spec("ucxx") is None:
        pytest.skip("ucx: ucxx is not installed (pip install hpcproc[ucx])")
    return {"tcp": {"cookie": COOKIE}, "ucx": {"cookie": COOKIE, "host": "127.0.0.1"}}.get(kind, {})


def test_tick_period_comes_from_the_option_then_the_environment_then_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HPCPROC_TICK", raising=False)
    assert tick_period() == DEFAULT_TICK == 15.0
    monkeypatch.setenv("HPCPROC_TICK", "0.25")
    assert tick_period() == 0.25
    assert tick_period(2) == 2.0
    assert tick_period(0) == 0.0


@pytest.mark.parametrize("bad", ["-1", "soon", "nan", "inf"])
def test_bad_tick_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("HPCPROC_TICK", bad)
    with pytest.raises(ValueError, match="HPCPROC_TICK"):
        tick_period()


def test_bad_tick_option_is_refused() -> None:
    with pytest.raises(ValueError, match="tick"):
        create("tcp", cookie=COOKIE, tick=-0.5)
    with pytest.raises(ValueError, match="tick"):
        create("shm", tick="fast")


@pytest.mark.parametrize("kind", KINDS)
def test_idle_link_with_heartbeats_stays_up_for_many_ticks(kind: str) -> None:
    """Nothing is sent for 3 x 4 ticks: only the ticks keep the bundle alive."""
    options = _options(kind)

    async def main() -> list[Any]:
        transport = create(kind, tick=TICK, **options)
        try:
            a = await transport.new_endpoint()
            b = await transport.new_endpoint()
            conn = await a.connect(b.address, timeout=10)
            opened = await asyncio.wait_for(b.receive(), 10)
            assert isinstance(opened, ConnectionOpened)
            # The subject of the test is time passing without traffic, not a sync.
            await asyncio.sleep(3 * TICKS_TO_LOSS * TICK)
            await conn.send([b"still here"])
            events = []
            while True:
                event = await asyncio.wait_for(b.receive(), 10)
                events.append(event)
                if isinstance(event, Received | ErrorEvent):
                    break
            return events
        finally:
            await transport.close()

    events = asyncio.run(main())
    assert isinstance(events[-1], Received), events
    assert [bytes(f) for f in events[-1].frames] == [b"still here"]


@pytest.mark.parametrize("kind", ["tcp", "shm"])
def test_hung_peer_process_is_lost_within_a_bounded_number_of_ticks(kind: str) -> None:
    """A peer stopped with SIGSTOP keeps its sockets open: the heartbeat reports it."""
    options = _options(kind)
    env = dict(os.environ, HPCPROC_COOKIE=COOKIE, HPCPROC_TICK=str(TICK))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    with NodeServerProcess(kind, options, env=env, cwd=str(ROOT)) as server:

        async def main() -> Any:
            transport = create(kind, tick=TICK, **options)
            try:
                ep = await transport.new_endpoint()
                await ep.connect(server.node_id.address, timeout=10)
                os.kill(server.pid, signal.SIGSTOP)
                try:
                    while True:
                        event = await asyncio.wait_for(ep.receive(), BOUND)
                        if isinstance(event, ErrorEvent):
                            return event
                finally:
                    os.kill(server.pid, signal.SIGCONT)
            finally:
                await transport.close()

        try:
            event = asyncio.run(main())
        finally:
            server.kill()
    assert event.error.code is EventErrorCode.CONNECTION_LOST
    assert event.error.remote_address == server.node_id.address
    assert "silent" in event.error.message
