"""A process-layer node in a separate OS process, for cross-process tests and demos.

Run as ``python -m hpcproc.testing.node_server --transport NAME [--options JSON]``. It
creates the transport (``hpcproc.transports.create(NAME, **options)``) and a
:class:`~hpcproc.Node` on it, prints ``NODE <hex of the node's address>`` on stdout
(``NodeId(bytes.fromhex(hex))`` rebuilds the id) and serves spawn, link, monitor and
registry requests from other nodes until told to stop. Functions spawned on it must be
importable here (the working directory is on ``sys.path``) or travel by value.

stdin, one command per line, each answered by one ``OK`` or ``ERR <text>`` line:

``ping``
    Liveness.
``break <hex address>``
    Fault hook: ``break_connection(own address, address)`` on this node's transport
    (``ERR`` when it does not implement
    :class:`~hpcproc.transports.faults.FaultInjection`).
``stop``
    Close the node gracefully (its watchers see ``DiedNodeDown``), answer ``OK`` and
    exit 0. End of stdin does the same.

``say`` output of the node's logger goes to stderr. :class:`NodeServerProcess` is the
parent's handle (start, ``node_id``, ``stop``, ``kill``; always stopped on exit).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import IO, Any

from hpcproc._ids import NodeId
from hpcproc._node import Node
from hpcproc.transports import create
from hpcproc.transports.base import EndPointAddress
from hpcproc.transports.faults import require_fault_injection

__all__ = ["NodeServerProcess", "main"]

#: Bound on the child's start (imports, transport setup) and on its graceful stop.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


async def _serve(transport_name: str, options: Mapping[str, Any]) -> int:
    transport = create(transport_name, **options)
    node = Node(transport)
    await node.start()
    print(f"NODE {bytes(node.node_id.address).hex()}", flush=True)
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def readable() -> None:
        line = sys.stdin.readline()
        lines.put_nowait(line if line else None)

    loop.add_reader(sys.stdin.fileno(), readable)
    try:
        while True:
            line = await lines.get()
            if line is None:
                break
            cmd, _, arg = line.strip().partition(" ")
            if cmd == "ping":
                print("OK", flush=True)
            elif cmd == "break":
                try:
                    await require_fault_injection(transport).break_connection(
                        node.node_id.address, EndPointAddress(bytes.fromhex(arg))
                    )
                except Exception as exc:
                    print(f"ERR {exc!r}", flush=True)
                else:
                    print("OK", flush=True)
            elif cmd == "stop":
                break
            elif cmd:
                print(f"ERR unknown command {cmd!r}", flush=True)
    finally:
        loop.remove_reader(sys.stdin.fileno())
        await node.close()
        await transport.close()
    with contextlib.suppress(Exception):
        print("OK", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m hpcproc.testing.node_server``."""
    parser = argparse.ArgumentParser(prog="python -m hpcproc.testing.node_server")
    parser.add_argument("--transport", default="tcp")
    parser.add_argument("--options", default="{}", help="JSON object of transport options")
    args = parser.parse_args(argv)
    return asyncio.run(_serve(args.transport, json.loads(args.options)))


class NodeServerProcess:
    """Parent-side handle on a node server child process.

    ``prefix`` goes before the command line (for example ``nsenter --net=...`` to
    start the node in another network namespace). Starting blocks until the child
    printed its node id (bounded by ``START_TIMEOUT``). Use as a context manager, or call :meth:`stop`: the child is
    always ended (gracefully, then killed).

    Raises (from the constructor):
        RuntimeError: the child exited or printed nothing within ``START_TIMEOUT``.
    """

    def __init__(
        self,
        transport: str = "tcp",
        options: Mapping[str, Any] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        child_env = dict(os.environ if env is None else env)
        self._proc = subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-m",
                "hpcproc.testing.node_server",
                "--transport",
                transport,
                "--options",
                json.dumps(dict(options or {})),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=child_env,
            cwd=cwd,
        )
        try:
            line = self._readline(START_TIMEOUT)
            if not line.startswith("NODE "):
                raise RuntimeError(f"node server did not start (said {line!r})")
            self.node_id = NodeId(bytes.fromhex(line.split()[1]))
        except BaseException:
            self.kill()
            raise

    def _readline(self, timeout: float) -> str:
        out: IO[str] | None = self._proc.stdout
        assert out is not None
        ready, _, _ = select.select([out], [], [], timeout)
        if not ready:
            raise RuntimeError(f"node server said nothing within {timeout} s")
        return out.readline().strip()

    def command(self, line: str, timeout: float = STOP_TIMEOUT) -> str:
        """Send one command line and return the answer line (``OK ...`` / ``ERR ...``)."""
        stdin = self._proc.stdin
        assert stdin is not None
        stdin.write(line + "\n")
        stdin.flush()
        return self._readline(timeout)

    def stop(self) -> int | None:
        """Stop gracefully (``stop`` command), killing after ``STOP_TIMEOUT``; idempotent.

        Returns the exit status (None if it had to be killed).
        """
        if self._proc.poll() is not None:
            return self._proc.returncode
        try:
            self.command("stop")
            return self._proc.wait(STOP_TIMEOUT)
        except (OSError, RuntimeError, subprocess.TimeoutExpired, ValueError):
            self.kill()
            return None

    def kill(self) -> None:
        """End the child at once (SIGKILL); idempotent."""
        if self._proc.poll() is None:
            self._proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(STOP_TIMEOUT)
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    @property
    def pid(self) -> int:
        """The child's OS process id (to signal it, e.g. ``SIGSTOP`` for a hung peer)."""
        return self._proc.pid

    @property
    def alive(self) -> bool:
        """True while the child runs."""
        return self._proc.poll() is None

    def __enter__(self) -> NodeServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.kill()


if __name__ == "__main__":
    sys.exit(main())
