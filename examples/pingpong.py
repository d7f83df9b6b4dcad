"""Ping-pong: two processes on two nodes bounce ``Ping(pid)`` messages over TCP.

``make demo`` runs ``python examples/pingpong.py [ROUNDS]``: this OS process is node A;
it starts node B as a second OS process (:mod:`hpcproc.testing.node_server`), spawns
the ``pong`` process on B and the ``ping`` process on A, and prints the round trips.
Each process answers a ``Ping`` with a ``Ping`` carrying its own pid, so neither needs
to know the other in advance. Both nodes share a freshly generated cookie.

Under a launcher, ``python -m hpcproc.run examples/pingpong.py:main`` plays the same
game between rank 0 and every other rank in turn (see :func:`main`).

The functions and the message type live in this module, which node B imports by
name (``pingpong.pong``): the script's directory is put on B's ``PYTHONPATH``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hpcproc as hp
from hpcproc.testing.node_server import NodeServerProcess

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass(frozen=True)
class Ping:
    """A ball: who to bounce it back to."""

    sender: hp.Pid


async def pong() -> None:
    """Bounce every Ping back to its sender until killed."""
    while True:
        ball = await hp.expect(Ping)
        await hp.send(ball.sender, Ping(hp.self_pid()))


async def ping(partner: hp.Pid, rounds: int, report: hp.Pid) -> None:
    """Serve ``rounds`` balls to ``partner``; report the elapsed time to ``report``."""
    start = time.perf_counter()
    for _ in range(rounds):
        await hp.send(partner, Ping(hp.self_pid()))
        ball = await hp.expect(Ping, timeout=30)
        if ball is None:
            raise RuntimeError("the ball was lost")
    await hp.send(report, time.perf_counter() - start)


async def game(node_b: hp.NodeId, rounds: int) -> float:
    """Spawn pong on node B and ping here; return the seconds the rounds took."""
    pong_pid = await hp.spawn(node_b, pong)
    ping_pid = await hp.spawn_link(hp.self_node(), ping, pong_pid, rounds, hp.self_pid())
    hp.say(f"ping {ping_pid} <-> pong {pong_pid} on {node_b.full()}")
    elapsed = await hp.expect(float, timeout=120)
    await hp.kill(pong_pid, "game over")
    if elapsed is None:
        raise RuntimeError("no result from ping")
    return float(elapsed)


async def main(cluster: hp.Cluster) -> int:
    """``python -m hpcproc.run examples/pingpong.py:main``: rank 0 plays a game with
    every worker node in turn (pong there, ping here); ``PINGPONG_ROUNDS`` (1000)."""
    rounds = int(os.environ.get("PINGPONG_ROUNDS", "1000"))
    for partner in list(cluster.peers) or [hp.self_node()]:
        elapsed = await game(partner, rounds)
        print(
            f"pingpong with {cluster.describe_node(partner)}: {rounds} round trips,"
            f" {elapsed / rounds * 1e6:.1f} us per round trip",
            flush=True,
        )
    return 0


async def run(rounds: int) -> None:
    cookie = secrets.token_hex(16)
    env = dict(os.environ, HPCPROC_COOKIE=cookie)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(HERE), str(ROOT), env.get("PYTHONPATH", "")) if p
    )
    server = await asyncio.to_thread(NodeServerProcess, "tcp", env=env, cwd=str(ROOT))
    try:
        transport = hp.transports.create("tcp", cookie=cookie)
        async with hp.Node(transport) as node_a:
            print(f"node A: {node_a.node_id}\nnode B: {server.node_id}")
            elapsed = await node_a.run(game, server.node_id, rounds)
        await transport.close()
    finally:
        await asyncio.to_thread(server.stop)
    print(
        f"{rounds} round trips in {elapsed:.3f} s: "
        f"{elapsed / rounds * 1e6:.1f} us per round trip, {rounds / elapsed:.0f} round trips/s"
    )


if __name__ == "__main__":
    # Run through the importable module, so that node B loads the same `pingpong`.
    sys.path.insert(0, str(HERE))
    import pingpong

    asyncio.run(pingpong.run(int(sys.argv[1]) if len(sys.argv) > 1 else 10000))
