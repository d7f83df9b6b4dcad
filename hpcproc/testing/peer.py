"""An endpoint in a separate OS process, driven over stdin/stdout, for two-process tests.

Run as ``python -m hpcproc.testing.peer --transport NAME [--options JSON]``. The peer
creates the transport (``hpcproc.transports.create(NAME, **options)``) and one endpoint,
prints ``ADDRESS <hex>`` and serves that endpoint as network-transport-tests' echo
server: it connects back to every peer that opens a connection, and answers every
message on that connection. Line protocol:

stdin, one command per line, each answered by exactly one ``OK [text]`` or
``ERR <text>`` line on stdout, in order:

``mode echo``
    Answer a message with the same frames (the default).
``mode objects``
    Deserialize the message with :mod:`hpcproc.serialization` and answer
    ``serialize((obj, shared))``, where ``shared`` maps each key of a dict message
    whose value is a numpy array to whether that array shares memory with a received
    frame (that is, was rebuilt without a copy).
``break <hex address>``
    Call the fault hook ``break_connection(own address, address)`` (``ERR`` when the
    transport does not implement :class:`~hpcproc.transports.faults.FaultInjection`).
``ping``
    Answer ``OK`` (liveness).
``quit``
    Close the transport, answer ``OK`` and exit 0 (end of stdin does the same).

stdout also carries asynchronous lines ``EVENT lost <hex address>`` (an
``ErrorEvent(CONNECTION_LOST)``) and ``EVENT <code> <message>`` (other errors).

:class:`PeerProcess` is the parent's handle on such a process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import signal
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from hpcproc import serialization
from hpcproc.transports import create
from hpcproc.transports.base import (
    Connection,
    ConnectionClosed,
    ConnectionId,
    ConnectionOpened,
    EndPointAddress,
    ErrorEvent,
    EventErrorCode,
    Received,
    Transport,
)
from hpcproc.transports.faults import require_fault_injection

__all__ = ["PeerError", "PeerProcess", "main"]


class PeerError(Exception):
    """The peer process answered ``ERR``, exited, or did not answer in time."""


class PeerProcess:
    """The parent's handle on a peer process; see the module docstring.

    Create with :meth:`start`; always :meth:`stop` it (it also reaps a killed one).
    """

    def __init__(self, process: asyncio.subprocess.Process, address: bytes) -> None:
        self.process = process
        self.address = EndPointAddress(address)
        self._replies: asyncio.Queue[str | None] = asyncio.Queue()
        self._events: asyncio.Queue[str | None] = asyncio.Queue()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def start(
        cls,
        transport: str,
        *,
        options: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> PeerProcess:
        """Start ``python -m hpcproc.testing.peer`` and wait for its address.

        Raises:
            PeerError: it exited or printed no address within ``timeout`` seconds (it
                is killed and reaped before this is raised).
        """
        argv = [sys.executable, "-m", "hpcproc.testing.peer", "--transport", transport]
        argv += ["--options", json.dumps(dict(options or {}))]
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), timeout)
        except asyncio.TimeoutError:
            line = b""
        text = line.decode(errors="replace").strip()
        if not text.startswith("ADDRESS "):
            await _reap(process, kill=True)
            raise PeerError(f"peer for {transport!r} printed {text!r} instead of its address")
        return cls(process, bytes.fromhex(text.split(" ", 1)[1]))

    async def _read(self) -> None:
        assert self.process.stdout is not None
        try:
            async for raw in self.process.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                if line.startswith("EVENT "):
                    self._events.put_nowait(line[6:])
                else:
                    self._replies.put_nowait(line)
        finally:
            self._replies.put_nowait(None)
            self._events.put_nowait(None)

    async def command(self, line: str, timeout: float) -> str:
        """Send one command and return the text after ``OK``.

        Raises:
            PeerError: the peer answered ``ERR``, exited, or did not answer in time.
        """
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(line.encode() + b"\n")
            await asyncio.wait_for(self.process.stdin.drain(), timeout)
            reply = await asyncio.wait_for(self._replies.get(), timeout)
        except (asyncio.TimeoutError, ConnectionError) as exc:
            raise PeerError(f"peer did not answer {line!r}: {exc!r}") from exc
        if reply is None:
            self._replies.put_nowait(None)
            raise PeerError(f"peer exited before answering {line!r}")
        if not reply.startswith("OK"):
            raise PeerError(f"peer answered {line!r} with {reply!r}")
        return reply[3:]

    async def event(self, timeout: float) -> str:
        """The next asynchronous ``EVENT`` line (without the ``EVENT`` tag).

        Raises:
            PeerError: the peer exited or reported nothing within ``timeout``.
        """
        try:
            event = await asyncio.wait_for(self._events.get(), timeout)
        except asyncio.TimeoutError:
            raise PeerError(f"peer reported no event within {timeout} s") from None
        if event is None:
            self._events.put_nowait(None)
            raise PeerError("peer exited")
        return event

    async def kill(self, timeout: float) -> None:
        """SIGKILL the peer (a crash: it closes nothing) and wait until it is gone.

        Once this returns the kernel has closed every socket of the process.

        Raises:
            PeerError: the process did not exit within ``timeout``.
        """
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except asyncio.TimeoutError:
            raise PeerError(f"peer did not exit within {timeout} s of SIGKILL") from None

    async def stop(self, timeout: float) -> None:
        """Ask the peer to quit; kill it if it does not within ``timeout``; reap it."""
        if self.process.returncode is None:
            with contextlib.suppress(PeerError):
                await self.command("quit", timeout)
        await _reap(self.process, kill=False, timeout=timeout)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


async def _reap(process: asyncio.subprocess.Process, *, kill: bool, timeout: float = 5.0) -> None:
    if process.stdin is not None:
        process.stdin.close()
    if not kill:
        try:
            await asyncio.wait_for(process.wait(), timeout)
            return
        except asyncio.TimeoutError:
            pass
    if process.returncode is None:
        process.kill()
    await process.wait()


# --------------------------------------------------------------------------- the peer


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _shared(obj: object, frames: list[memoryview]) -> dict[str, bool]:
    if not isinstance(obj, dict):
        return {}
    return {
        str(key): any(np.shares_memory(value, np.asarray(f)) for f in frames)
        for key, value in obj.items()
        if isinstance(value, np.ndarray)
    }


async def _serve(name: str, options: dict[str, Any]) -> None:
    made = create(name, **options)
    transport: Transport = await made if inspect.isawaitable(made) else made
    try:
        endpoint = await transport.new_endpoint()
        mode = "echo"

        async def server() -> None:
            back: dict[ConnectionId, Connection] = {}
            while True:
                event = await endpoint.receive()
                if isinstance(event, ConnectionOpened):
                    back[event.conn_id] = await endpoint.connect(event.remote_address)
                elif isinstance(event, Received):
                    if mode == "objects":
                        frames = list(event.frames)
                        obj = serialization.deserialize(frames)
                        reply = serialization.serialize((obj, _shared(obj, frames[1:])))
                        await back[event.conn_id].send(reply)
                    else:
                        await back[event.conn_id].send(event.frames)
                elif isinstance(event, ConnectionClosed):
                    await back.pop(event.conn_id).close()
                elif isinstance(event, ErrorEvent):
                    error = event.error
                    if error.code is EventErrorCode.CONNECTION_LOST and error.remote_address:
                        _say(f"EVENT lost {error.remote_address.hex()}")
                        for conn_id, conn in list(back.items()):
                            if conn.remote_address == error.remote_address:
                                del back[conn_id]
                    else:
                        _say(f"EVENT {error.code.value} {error.message}")
                else:
                    return

        task = asyncio.get_running_loop().create_task(server())
        _say(f"ADDRESS {endpoint.address.hex()}")
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            raw = await reader.readline()
            if not raw:
                break
            command, _, arg = raw.decode().strip().partition(" ")
            if task.done():
                _say(f"ERR echo server stopped: {task.exception()!r}")
                continue
            try:
                if command == "mode" and arg in ("echo", "objects"):
                    mode = arg
                elif command == "break":
                    remote = EndPointAddress(bytes.fromhex(arg))
                    faults = require_fault_injection(transport)
                    await faults.break_connection(endpoint.address, remote)
                elif command == "quit":
                    break
                elif command != "ping":
                    raise ValueError(f"unknown command {raw!r}")
            except Exception as exc:
                _say(f"ERR {exc!r}")
            else:
                _say("OK")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        await asyncio.wait_for(transport.close(), 10.0)
    _say("OK")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m hpcproc.testing.peer``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m hpcproc.testing.peer")
    parser.add_argument("--transport", required=True, help="registry name of the transport")
    parser.add_argument("--options", default="{}", help="factory options as a JSON object")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.transport, json.loads(args.options)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
