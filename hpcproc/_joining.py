"""``python -m hpcproc.join ADDRESS`` (:mod:`hpcproc.join`): add a worker node to a running cluster.

Usage::

    python -m hpcproc.join [--transport NAME] [--host ADDR] [--timeout S] ADDRESS [ENTRY]

``ADDRESS`` is any member's node address as it prints it (``str(node.node_id)``,
``nid://tcp://host:port/...``, or the endpoint address without ``nid://``), or
``@FILE`` to read it from a file (one a running master wrote, on a shared file
system). ``ENTRY`` is the job's ``module:function`` (or ``file.py:function``) as
given to ``hpcproc.run``: its module is imported, as on the launcher's workers, so that
functions the master sends by reference load here; the function is not run. The
transport is the one the address names (``--transport`` to override). The node shares
the cluster's cookie (``HPCPROC_COOKIE`` or ``~/.hpcproc/cookie``, as every node),
which the transport's handshake checks.

The node joins (:func:`hpcproc.join`; the members get ``NodeUp`` through
``hp.monitor_nodes()``), then serves spawn requests until:

- the cluster's master ends (``hpcproc.run``'s master sends every member its exit
  status): exits with that status;
- the master goes away without that: exits with 1;
- it gets SIGTERM / SIGINT: it *leaves* (closes gracefully: watchers of it and of its
  processes get ``DiedNodeDown``, members get ``NodeDown``) and exits with 128 + the
  signal number. Unlike a rank a launcher started, a joined node leaving does not end
  the job.

``--host`` is the address the other members dial (default: the local address this
host uses to reach the member in ``ADDRESS``). This is how a second ``srun`` step
adds workers to a running job::

    srun -N1 -w host3 python -m hpcproc.join @$HOME/job-$SLURM_JOB_ID.addr app:main
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._ids import NodeId
    from ._node import Node
    from .transports.base import Transport

__all__ = ["main", "serve_member"]

log = logging.getLogger("hpcproc.join")


def _line(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def route_address(host: str) -> str:
    """The local address this host uses to reach ``host`` (no packet is sent)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((host, 9))
        address: str = probe.getsockname()[0]
        return address
    finally:
        probe.close()


def create_transport(name: str, host: str) -> Transport:
    """The transport a joining node uses: tcp (or shm+tcp's tcp) listening on ``host``
    (its advertised address), or any other transport of the registry by name."""
    from . import transports

    if name in ("tcp", "shm+tcp"):
        return transports.create(name, host=host)
    return transports.create(name)


def _read_address(text: str) -> str:
    if text.startswith("@"):
        with open(text[1:], encoding="utf-8") as f:
            return f.read().strip()
    return text


async def serve_member(node: Node, stop: asyncio.Future[int], contact: NodeId | None) -> int:
    """Join through ``contact`` (None: already a member), then serve until the master
    says Shutdown (its status), the leader goes away (1) or ``stop`` completes with a
    signal number (128 + it). The caller closes the node.

    Raises:
        JoinError: the join failed.
    """
    import hpcproc as hp

    from ._membership import NodeDown, join, leader
    from .run import CONTROLLER, Shutdown

    inbox: asyncio.Queue[Any] = asyncio.Queue()

    async def controller() -> None:
        hp.monitor_nodes()
        while True:
            inbox.put_nowait(await hp.expect())

    node.register(CONTROLLER, node.spawn_local(controller))

    async def joined() -> NodeId | None:
        if contact is not None:
            await join(contact)
        return leader() or contact

    chief = await node.run(joined)
    while True:
        getter = asyncio.ensure_future(inbox.get())
        await asyncio.wait({getter, stop}, return_when=asyncio.FIRST_COMPLETED)
        if stop.done():
            getter.cancel()
            return 128 + stop.result()
        msg = getter.result()
        if isinstance(msg, Shutdown):
            return msg.status
        if isinstance(msg, NodeDown) and msg.node == chief:
            _line(f"hpcproc.join: the cluster's master {msg.node} went away: {msg.reason!r}")
            return 1


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hpcproc.join",
        description="Add a worker node to a running hpcproc cluster.",
    )
    parser.add_argument(
        "--transport",
        default=None,
        help="transport name (default: the one of the member's address, e.g. tcp)",
    )
    parser.add_argument("--host", default=None, help="address the members dial (default: route)")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="join timeout in seconds (default 30)"
    )
    parser.add_argument("address", help="a member's node address, or @FILE holding it")
    parser.add_argument(
        "entry",
        nargs="?",
        default=None,
        help="the job's module:function or file.py:function: its module is imported (as on"
        " every worker) so that functions sent by reference load; it is not run here",
    )
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=os.environ.get("HPCPROC_LOG_LEVEL", "WARNING"),
        format="hpcproc[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        from ._membership import _node_id

        contact = _node_id(_read_address(args.address))
    except (OSError, ValueError) as exc:
        _line(f"hpcproc.join: {exc}")
        return 2
    if args.entry is not None:
        from .run import load_entry

        try:
            load_entry(args.entry)
        except (ImportError, ValueError) as exc:
            _line(f"hpcproc.join: cannot load {args.entry}: {exc}")
            return 2
    return asyncio.run(_main(args, contact))


async def _main(args: argparse.Namespace, contact: NodeId) -> int:
    import hpcproc as hp

    from ._membership import JoinError

    network = bytes(contact.address)
    routed = network.startswith(b"route:")
    if routed:
        # A job of the routing transport (auto across hosts: shm+tcp): this node
        # runs on another host, so it reaches the members over the network part.
        from .transports.base import TransportError
        from .transports.routing import parse_address as parse_routing

        try:
            network = bytes(parse_routing(network)[2])
        except TransportError as exc:
            _line(f"hpcproc.join: {exc}")
            return 2
    if args.transport is None:
        scheme = network.partition(b":")[0].decode("ascii", "replace")
        args.transport = f"shm+{scheme}" if routed else scheme
    host = args.host
    if host is None and args.transport in ("tcp", "shm+tcp"):
        from .transports.tcp import parse_address

        try:
            host = route_address(parse_address(network).host)
        except (ValueError, OSError) as exc:
            _line(f"hpcproc.join: cannot tell which address to advertise ({exc}); pass --host")
            return 2
    try:
        transport = create_transport(args.transport, host or "127.0.0.1")
    except Exception as exc:  # unknown name, missing optional dependency
        _line(f"hpcproc.join: cannot create the {args.transport} transport: {exc}")
        return 2
    stop, unhandle = stop_on_signals(asyncio.get_running_loop())
    node = hp.Node(transport)
    await node.start()
    try:
        _line(f"hpcproc.join: node {node.node_id} joining through {contact}")
        status = await serve_member(node, stop, contact)
        if status > 128 and stop.done():
            _line(f"hpcproc.join: {signal.Signals(status - 128).name}: leaving the cluster")
        return status
    except JoinError as exc:
        _line(f"hpcproc.join: {exc}")
        return 1
    finally:
        await node.close()
        await transport.close()
        unhandle()


def stop_on_signals(
    loop: asyncio.AbstractEventLoop,
) -> tuple[asyncio.Future[int], Callable[[], None]]:
    """A future completed with the number of the first SIGTERM / SIGINT, and the function
    that removes the handlers again. Handlers are installed from the main thread only
    (elsewhere the embedding program owns signals, and the future never completes)."""
    stop: asyncio.Future[int] = loop.create_future()

    def stopped(signum: int) -> None:
        if not stop.done():
            stop.set_result(signum)

    handled = (
        (signal.SIGTERM, signal.SIGINT)
        if threading.current_thread() is threading.main_thread()
        else ()
    )
    for s in handled:
        loop.add_signal_handler(s, stopped, s)

    def unhandle() -> None:
        for s in handled:
            loop.remove_signal_handler(s)

    return stop, unhandle
