"""``python -m hpcproc.run --discover``: nodes that find each other by UDP multicast.

Cloud Haskell's SimpleLocalnet, without a scheduler or configuration: start the same
command on each machine of a local network, with the same cookie::

    python -m hpcproc.run --discover [--group 224.0.0.99:9999] [--min-nodes N]
                          [--interface ADDR] [--timeout S] app:main

Each node announces itself on the group (:mod:`hpcproc.rendezvous.multicast`,
signed with the cookie) and listens. Election: the *lowest address* among the nodes
heard becomes the master, once ``--min-nodes`` nodes (itself included) have been heard
and no new one for :data:`SETTLE` seconds, or once ``--timeout`` has passed with fewer;
it then announces itself as master. Every other node joins the first master it hears
(:func:`hpcproc.join`), also one that arrives long after the start. The master runs
``main(cluster)`` once ``--min-nodes - 1`` workers have joined (or at the timeout with
those that did): ``cluster.peers`` are those workers, and later arrivals are reported
to ``hp.monitor_nodes()`` subscribers as ``NodeUp``. Workers serve until the master
ends (they exit with its status) or goes away (status 1).

Unlike ranks a launcher started, discovered workers are not linked to ``main``: a
worker that leaves (SIGTERM: ``DiedNodeDown``) or is lost is reported to
``hp.monitor_nodes()`` subscribers as ``NodeDown`` and to monitors of its processes,
and ``main`` goes on. Signals to the master end the job (every member exits with 128 +
the signal number).

Two masters can only arise if nodes that started within one :data:`SETTLE` window
heard different sets (lossy multicast); each then leads its own cluster, and a node
arriving later joins the lowest-addressed master it hears.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from .launchers import ClusterInfo

if TYPE_CHECKING:
    from ._node import Node
    from .run import Cluster

__all__ = ["SETTLE", "run_discover"]

#: Quiet time (no new node heard) before the lowest address takes the lead.
SETTLE = 1.0
#: Seconds between announcements.
ANNOUNCE_EVERY = 0.2


def _line(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


async def run_discover(
    info: ClusterInfo,
    entry: Callable[[Cluster], Coroutine[Any, Any, Any]],
    args: argparse.Namespace,
) -> int:
    """One discovering node's whole life; returns its exit status."""
    import hpcproc as hp

    from ._joining import route_address, stop_on_signals
    from .auth import CookieError, load_cookie
    from .rendezvous.multicast import DEFAULT_GROUP, Announcer, parse_group

    try:
        group = parse_group(args.group) if args.group else DEFAULT_GROUP
        cookie = load_cookie()
        host = args.interface or route_address(group[0])
    except (ValueError, OSError, CookieError) as exc:
        _line(f"hpcproc.run --discover: {exc}")
        return 2
    stop, unhandle = stop_on_signals(asyncio.get_running_loop())
    transport = hp.transports.create("tcp", host=host)
    node = hp.Node(transport)
    await node.start()
    announcer = Announcer(
        cookie, bytes(node.node_id.address), info.hostname, group=group, interface=args.interface
    )
    try:
        await announcer.start()
        master = await _elect(node, announcer, args.min_nodes, args.timeout, stop)
        if master is None:
            return await _lead(node, announcer, info, entry, args, stop)
        announcer.close()
        from ._joining import serve_member

        return await serve_member(node, stop, hp.NodeId(master))
    except OSError as exc:
        _line(f"hpcproc.run --discover: {exc}")
        return 2
    except _Interrupted as exc:
        return 128 + exc.signum
    except hp.JoinError as exc:
        _line(f"hpcproc.run --discover: {exc}")
        return 1
    finally:
        announcer.close()
        await node.close()
        await transport.close()
        unhandle()


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


async def _elect(
    node: Node, announcer: Any, min_nodes: int, timeout: float, stop: asyncio.Future[int]
) -> bytes | None:
    """Announce and listen until a master is known: its address, or None if it is us.

    Raises:
        _Interrupted: a signal arrived meanwhile.
        OSError: no master appeared within twice ``timeout`` (the message says so).
    """
    me = bytes(node.node_id.address)
    start = time.monotonic()
    deadline = start + timeout
    heard = 0
    quiet_since = start
    while True:
        if stop.done():
            raise _Interrupted(stop.result())
        announcer.announce()
        masters = sorted(a for a, ann in announcer.seen.items() if ann.role == "master")
        if masters:
            found: bytes = masters[0]
            return found
        now = time.monotonic()
        if len(announcer.seen) != heard:
            heard, quiet_since = len(announcer.seen), now
        lowest = min([me, *announcer.seen])
        settled = heard + 1 >= min_nodes and now - quiet_since >= SETTLE
        if (settled or now >= deadline) and lowest == me:
            return None
        if now >= deadline + timeout:
            raise OSError(
                f"no master announced itself within {2 * timeout:g} s (heard {heard} other"
                f" node(s); the lowest address, {lowest.decode(errors='replace')}, leads)"
            )
        announcer.changed.clear()
        await asyncio.wait(
            {asyncio.ensure_future(announcer.changed.wait()), stop},
            timeout=ANNOUNCE_EVERY,
            return_when=asyncio.FIRST_COMPLETED,
        )


async def _lead(
    node: Node,
    announcer: Any,
    info: ClusterInfo,
    entry: Callable[[Cluster], Coroutine[Any, Any, Any]],
    args: argparse.Namespace,
    stop: asyncio.Future[int],
) -> int:
    """The master: take joins, run ``main`` once enough workers joined, end the job."""
    from ._membership import members_of, start_membership
    from .run import Cluster, Interrupted, Shutdown

    me = node.node_id
    start_membership(node, leader=me)
    announcer.role = "master"
    deadline = time.monotonic() + args.timeout
    while len(members_of(node)) < args.min_nodes - 1 and time.monotonic() < deadline:
        if stop.done():
            break
        announcer.announce()
        await asyncio.wait({stop}, timeout=ANNOUNCE_EVERY)

    async def keep_announcing() -> None:
        while True:
            announcer.announce()
            await asyncio.sleep(ANNOUNCE_EVERY)

    announcing = asyncio.ensure_future(keep_announcing())
    try:
        if stop.done():
            status, why = 128 + stop.result(), stop.result()
        else:
            peers = members_of(node)
            if len(peers) < args.min_nodes - 1:
                _line(
                    f"hpcproc.run --discover: {len(peers)} worker(s) joined within"
                    f" {args.timeout:g} s (--min-nodes {args.min_nodes}); running main with them"
                )
            hosts = {a: ann.host for a, ann in announcer.seen.items()}
            nodes = (me, *peers)
            cluster = Cluster(
                rank=0,
                size=len(nodes),
                node=node,
                nodes=nodes,
                hosts=tuple(
                    info.hostname if n is me else hosts.get(bytes(n.address), "?") for n in nodes
                ),
                info=info,
                peers=peers,
            )
            main = asyncio.ensure_future(node.run(entry, cluster))
            await asyncio.wait({main, stop}, return_when=asyncio.FIRST_COMPLETED)
            if main.done():
                status, why = _status(main), 0
            else:
                main.cancel()
                status, why = 128 + stop.result(), stop.result()
    finally:
        announcing.cancel()
        announcer.close()
    interrupted = Interrupted(why, 0, info.hostname) if why else None
    if interrupted is not None:
        _line(f"hpcproc.run --discover: master {interrupted.describe(0)}")
    for nid in members_of(node):
        node.nsend_remote(nid, "hpcproc.run", Shutdown(status, interrupted))
    return status


def _status(main: asyncio.Future[Any]) -> int:
    exc = main.exception()
    if exc is not None:
        _line(f"hpcproc.run --discover: main failed: {type(exc).__name__}: {exc}")
        return 1
    result = main.result()
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
