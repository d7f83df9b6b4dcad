"""UCX-specific promises: authentication, failure detection, frames, configuration.

The transport-independent semantics are in ``test_transport_conformance.py`` (run with
``-k ucx``). These tests use the real ucxx wheel on CPU with ``UCX_TLS=tcp,sm,self``
and real OS processes (:mod:`hpcproc.testing.peer`) for the failure cases.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import pytest

from hpcproc.testing.peer import PeerProcess
from hpcproc.transports import (
    ConnectError,
    ConnectErrorCode,
    ConnectionClosed,
    ConnectionOpened,
    EndPoint,
    ErrorEvent,
    Event,
    EventErrorCode,
    Received,
    SendError,
    SendErrorCode,
    create,
    ucx,
)
from hpcproc.transports.base import Buffer

pytest.importorskip("ucxx", reason="ucxx is not installed (pip install hpcproc[ucx])")
pytestmark = pytest.mark.ucx

COOKIE = "test-cookie-for-ucx"
ENV = {"UCX_TLS": "tcp,sm,self", "HPCPROC_COOKIE": COOKIE}
WAIT = 10.0
T = TypeVar("T")


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)


def run(main: Callable[[], Awaitable[T]], timeout: float = 120.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(main(), timeout)

    return asyncio.run(bounded())


async def next_event(endpoint: EndPoint) -> Event:
    return await asyncio.wait_for(endpoint.receive(), WAIT)


async def expect(endpoint: EndPoint, kind: type[T]) -> T:
    event = await next_event(endpoint)
    assert isinstance(event, kind), f"expected {kind.__name__}, got {event!r}"
    return event


def message(*parts: Any) -> list[Buffer]:
    """A message from buffers (numpy arrays satisfy ``Buffer`` at run time)."""
    return list(parts)


async def start_peer() -> PeerProcess:
    return await PeerProcess.start("ucx", env=ENV, timeout=30.0)


# ------------------------------------------------------------------ authentication


def test_wrong_cookie_is_refused_and_nothing_is_delivered(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        server = ucx.UcxTransport(cookie="right")
        intruder = ucx.UcxTransport(cookie="wrong")
        friend = ucx.UcxTransport(cookie="right")
        try:
            target = await server.new_endpoint()
            bad = await intruder.new_endpoint()
            with pytest.raises(ConnectError) as info:
                await asyncio.wait_for(bad.connect(target.address), WAIT)
            assert info.value.code is ConnectErrorCode.FAILED
            # The refused dialer delivered nothing: the first event the target sees is
            # the authenticated friend's connection.
            good = await friend.new_endpoint()
            conn = await asyncio.wait_for(good.connect(target.address), WAIT)
            await conn.send([b"hello"])
            opened = await expect(target, ConnectionOpened)
            assert opened.remote_address == good.address
            received = await expect(target, Received)
            assert [bytes(f) for f in received.frames] == [b"hello"]
        finally:
            for transport in (server, intruder, friend):
                await asyncio.wait_for(transport.close(), WAIT)

    with caplog.at_level(logging.WARNING, logger="hpcproc.transports.ucx"):
        run(main)
    assert any("authentication failed" in r.getMessage() for r in caplog.records)


def test_wrong_cookie_from_another_process_is_refused() -> None:
    async def main() -> None:
        env = {**ENV, "HPCPROC_COOKIE": "the peer's cookie"}
        peer = await PeerProcess.start("ucx", env=env, timeout=30.0)
        transport = create("ucx")
        try:
            endpoint = await transport.new_endpoint()
            with pytest.raises(ConnectError) as info:
                await asyncio.wait_for(endpoint.connect(peer.address), WAIT)
            assert info.value.code is ConnectErrorCode.FAILED
            assert await peer.command("ping", WAIT) == ""
        finally:
            await peer.stop(WAIT)
            await asyncio.wait_for(transport.close(), WAIT)

    run(main)


def test_cookie_mismatch_fails_fast_naming_authentication_and_the_peer() -> None:
    """The dialer is told (not left to time out or see a closed pipe): the error says
    authentication failed, names the peer's address and the fix. Timeouts are 600 s
    and the test's own bound 60 s."""

    async def main() -> None:
        env = {**ENV, "HPCPROC_COOKIE": "the peer's cookie"}
        peer = await PeerProcess.start("ucx", env=env, timeout=30.0)
        transport = ucx.UcxTransport(cookie="ours", connect_timeout=600, handshake_timeout=600)
        try:
            endpoint = await transport.new_endpoint()
            with pytest.raises(ConnectError) as info:
                await asyncio.wait_for(endpoint.connect(peer.address), 60)
            assert info.value.code is ConnectErrorCode.FAILED
            text = str(info.value)
            assert "authentication failed" in text, text
            assert repr(peer.address) in text, text
            assert "HPCPROC_COOKIE" in text and "~/.hpcproc/cookie" in text, text
            assert await peer.command("ping", WAIT) == ""
        finally:
            await peer.stop(WAIT)
            await asyncio.wait_for(transport.close(), WAIT)

    run(main, timeout=120)


# ------------------------------------------------------------------ failures


def test_peer_sigkill_reports_connection_lost_and_fails_sends() -> None:
    async def main() -> None:
        peer = await start_peer()
        transport = create("ucx")
        try:
            endpoint = await transport.new_endpoint()
            conn = await asyncio.wait_for(endpoint.connect(peer.address), WAIT)
            await conn.send([b"ping"])
            await expect(endpoint, ConnectionOpened)  # the echo connection back
            received = await expect(endpoint, Received)
            assert [bytes(f) for f in received.frames] == [b"ping"]
            await peer.kill(WAIT)
            event = await next_event(endpoint)
            assert isinstance(event, ErrorEvent), event
            assert event.error.code is EventErrorCode.CONNECTION_LOST
            assert event.error.remote_address == peer.address
            with pytest.raises(SendError) as info:
                await conn.send([b"after death"])
            assert info.value.code is SendErrorCode.FAILED
            with pytest.raises(ConnectError) as connect_info:
                await asyncio.wait_for(endpoint.connect(peer.address), WAIT)
            assert connect_info.value.code is ConnectErrorCode.NOT_FOUND
        finally:
            await peer.stop(WAIT)
            await asyncio.wait_for(transport.close(), WAIT)

    run(main)


def test_peer_sigkill_during_large_transfer_reports_connection_lost() -> None:
    async def main() -> None:
        peer = await start_peer()
        transport = create("ucx")
        try:
            endpoint = await transport.new_endpoint()
            conn = await asyncio.wait_for(endpoint.connect(peer.address), WAIT)
            payload = np.ones(64 << 20, dtype=np.uint8)

            async def flood() -> None:
                with pytest.raises(SendError):
                    while True:
                        await conn.send(message(payload))

            flooding = asyncio.get_running_loop().create_task(flood())
            await expect(endpoint, ConnectionOpened)
            await peer.kill(WAIT)
            while True:
                event = await next_event(endpoint)
                if isinstance(event, ErrorEvent):
                    break
                assert isinstance(event, Received), event
            assert event.error.code is EventErrorCode.CONNECTION_LOST
            await asyncio.wait_for(flooding, WAIT)
        finally:
            await peer.stop(WAIT)
            await asyncio.wait_for(transport.close(), WAIT)

    run(main)


def test_connect_to_port_without_listener_raises_not_found() -> None:
    async def main() -> None:
        transport = create("ucx")
        other = create("ucx")
        try:
            endpoint = await transport.new_endpoint()
            gone = await other.new_endpoint()
            address = gone.address
            await asyncio.wait_for(other.close(), WAIT)
            with pytest.raises(ConnectError) as info:
                await asyncio.wait_for(endpoint.connect(address), WAIT)
            assert info.value.code is ConnectErrorCode.NOT_FOUND
        finally:
            await asyncio.wait_for(transport.close(), WAIT)

    run(main)


# ------------------------------------------------------------------ frames


def test_large_frames_arrive_in_buffers_of_their_final_size() -> None:
    async def main() -> None:
        transport = create("ucx")
        try:
            a = await transport.new_endpoint()
            b = await transport.new_endpoint()
            conn = await asyncio.wait_for(a.connect(b.address), WAIT)
            big = np.arange(3 << 20, dtype=np.uint8)
            medium = np.full(20000, 7, dtype=np.uint8)
            await conn.send(message(b"head", big, b"", medium, b"tail"))
            await expect(b, ConnectionOpened)
            event = await expect(b, Received)
            frames = event.frames
            assert [len(f) for f in frames] == [4, big.nbytes, 0, medium.nbytes, 4]
            assert bytes(frames[0]) == b"head" and bytes(frames[4]) == b"tail"
            for frame, sent in ((frames[1], big), (frames[3], medium)):
                owner = frame.obj
                assert isinstance(owner, np.ndarray) and owner.nbytes == sent.nbytes
                assert np.array_equal(np.asarray(frame), sent)
                assert not np.shares_memory(owner, sent)
        finally:
            await asyncio.wait_for(transport.close(), WAIT)

    run(main)


def test_small_and_large_messages_keep_their_order_on_a_connection() -> None:
    async def main() -> None:
        transport = create("ucx")
        try:
            a = await transport.new_endpoint()
            b = await transport.new_endpoint()
            conn = await asyncio.wait_for(a.connect(b.address), WAIT)
            sizes = [1 << 20, 3, 100_000, 0, 9000, 2 << 20, 8, 8192, 8193]
            for i, size in enumerate(sizes):
                await conn.send(message(np.full(size, i, dtype=np.uint8), b"%d" % i))
            await conn.close()
            await expect(b, ConnectionOpened)
            for i, size in enumerate(sizes):
                event = await expect(b, Received)
                body, label = event.frames
                assert bytes(label) == b"%d" % i
                assert len(body) == size and all(x == i for x in bytes(body[:16]))
            await expect(b, ConnectionClosed)
        finally:
            await asyncio.wait_for(transport.close(), WAIT)

    run(main)


def test_busy_poll_mode_delivers_large_messages() -> None:
    async def main() -> None:
        t1 = ucx.UcxTransport(busy_poll=True)
        t2 = ucx.UcxTransport(busy_poll=True)
        try:
            a = await t1.new_endpoint()
            b = await t2.new_endpoint()
            conn = await asyncio.wait_for(a.connect(b.address), WAIT)
            payload = np.arange(4 << 20, dtype=np.uint8)
            for _ in range(3):
                await asyncio.wait_for(conn.send(message(payload, b"x")), WAIT)
            await expect(b, ConnectionOpened)
            for _ in range(3):
                event = await expect(b, Received)
                assert np.array_equal(np.asarray(event.frames[0]), payload)
        finally:
            for transport in (t1, t2):
                await asyncio.wait_for(transport.close(), WAIT)

    run(main)


def test_message_over_the_frame_limit_is_refused_and_the_link_survives() -> None:
    async def main() -> None:
        transport = create("ucx")
        try:
            a = await transport.new_endpoint()
            b = await transport.new_endpoint()
            conn = await asyncio.wait_for(a.connect(b.address), WAIT)
            with pytest.raises(SendError) as info:
                await conn.send([b"x"] * (ucx.MAX_FRAMES + 1))
            assert info.value.code is SendErrorCode.FAILED
            frames = [b"%d" % i for i in range(ucx.MAX_FRAMES)]
            await conn.send(frames)
            await expect(b, ConnectionOpened)
            event = await expect(b, Received)
            assert [bytes(f) for f in event.frames] == frames
        finally:
            await asyncio.wait_for(transport.close(), WAIT)

    run(main)


# ------------------------------------------------------------------ configuration


def test_ucx_environment_configuration_passes_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UCX_TLS", "tcp,self")
    monkeypatch.setenv("UCX_RNDV_THRESH", "65536")

    async def main() -> dict[str, Any]:
        transport = ucx.UcxTransport()
        try:
            await transport.new_endpoint()
            engine = transport._engine
            assert engine is not None
            config: dict[str, Any] = engine.context.config
            return config
        finally:
            await asyncio.wait_for(transport.close(), WAIT)

    config = run(main)
    assert config["TLS"] == "tcp,self"
    assert "64K" in config["RNDV_THRESH"]


def test_address_carries_host_name_and_listener_port() -> None:
    async def main() -> None:
        transport = ucx.UcxTransport(host="127.0.0.1")
        try:
            endpoint = await transport.new_endpoint()
            parsed = ucx.parse_address(endpoint.address)
            assert parsed.host == "127.0.0.1"
            assert parsed.port == transport.port
        finally:
            await asyncio.wait_for(transport.close(), WAIT)
        default = ucx.UcxTransport()
        try:
            endpoint = await default.new_endpoint()
            assert ucx.parse_address(endpoint.address).host == socket.gethostname()
        finally:
            await asyncio.wait_for(default.close(), WAIT)

    run(main)


# ------------------------------------------------------------------ shutdown


def listening(port: int) -> bool:
    """Whether a TCP socket of this machine listens on ``port``."""
    return _accept_queue(port) is not None


def _accept_queue(port: int) -> int | None:
    """Connections waiting to be accepted on the socket listening on ``port``."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                local, state, queues = fields[1], fields[3], fields[4]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return int(queues.split(":")[1], 16)
    return None


#: A process that closes its transport while UCX has accepted a connection whose first
#: bytes have not arrived yet (the state a peer's dial is in for a moment), then sends
#: them. UCX 1.21 calls through the freed listener of that connection if the listener
#: was destroyed (freed memory is poisoned, so a use after free crashes).
HALF_ACCEPTED = textwrap.dedent(
    """
    import asyncio, socket, struct, sys, time
    sys.path.insert(0, sys.argv[1])
    from tests.test_ucx import _accept_queue
    from hpcproc.transports import create

    async def main():
        transport = create("ucx")
        await transport.new_endpoint()
        port = transport.port
        dial = socket.create_connection(("127.0.0.1", port))
        deadline = time.monotonic() + 10
        while _accept_queue(port) != 0:  # until UCX's async thread has accepted it
            assert time.monotonic() < deadline, "UCX did not accept the connection"
            await asyncio.sleep(0.01)
        # The worker outlives the transport, as it does while a link or a request of
        # the transport is still referenced.
        worker = transport._engine
        await transport.close()
        # A connection manager header (private data length 0, status 0).
        dial.sendall(struct.pack("<QB7x", 0, 0))
        # UCX refuses the bad header: wait for its answer (or for the crash).
        dial.setblocking(False)
        loop = asyncio.get_running_loop()
        print("answer", await asyncio.wait_for(loop.sock_recv(dial, 64), 10))
        dial.close()
        del worker

    asyncio.run(main())
    print("done")
    """
)


def test_closing_while_ucx_accepts_a_connection_does_not_crash_the_process() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", HALF_ACCEPTED, root],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **ENV, "MALLOC_PERTURB_": "165"},
    )
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert result.stdout.strip().endswith("done")


def test_closed_transport_answers_dials_until_the_next_transport_starts() -> None:
    async def main() -> None:
        closed = create("ucx")
        dialer = create("ucx")
        try:
            endpoint = await dialer.new_endpoint()
            gone = await closed.new_endpoint()
            port = closed.port
            assert port is not None
            await asyncio.wait_for(closed.close(), WAIT)
            # Still listening: the dial is accepted and closed at once.
            assert listening(port)
            with pytest.raises(ConnectError) as info:
                await asyncio.wait_for(endpoint.connect(gone.address), WAIT)
            assert info.value.code is ConnectErrorCode.NOT_FOUND
            # The next transport of this process releases the closed one's listener.
            after = create("ucx")
            try:
                await after.new_endpoint()
                assert not listening(port)
            finally:
                await asyncio.wait_for(after.close(), WAIT)
        finally:
            await asyncio.wait_for(dialer.close(), WAIT)

    run(main)


def test_shutdown_is_bounded_and_warns_about_nothing() -> None:
    script = textwrap.dedent(
        """
        import asyncio, gc, warnings
        warnings.simplefilter("error")
        from hpcproc.transports import create

        async def main():
            t1, t2 = create("ucx"), create("ucx")
            a, b = await t1.new_endpoint(), await t2.new_endpoint()
            conn = await a.connect(b.address)
            await conn.send([b"x" * 100000])
            await b.receive()
            await b.receive()
            back = await b.connect(a.address)
            await back.send([b"y"])
            await asyncio.wait_for(asyncio.gather(t1.close(), t2.close()), 10)

        asyncio.run(main())
        gc.collect()
        print("done")
        """
    )
    result = subprocess.run(
        [sys.executable, "-X", "dev", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **ENV},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("done")
    needles = (
        "still alive",
        "Unclosed",
        "ResourceWarning",
        "Task was destroyed",
        "ignored",
        "WARN",
    )
    for needle in needles:
        assert needle not in result.stdout + result.stderr
