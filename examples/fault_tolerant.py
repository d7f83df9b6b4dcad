"""A master that survives the loss of worker nodes (README, "Failures in practice").

``python -m hpcproc.run --np 4 examples/fault_tolerant.py:main`` squares 100 numbers on
the workers; kill a worker's OS process (``kill -9``) while it runs and the master
re-dispatches that worker's items to the others, and still exits 0.
"""

from __future__ import annotations

from typing import Any

import hpcproc as hp

N = 100


async def square(master: hp.Pid, x: int) -> None:
    await hp.send(master, (hp.self_pid(), x * x))


async def main(cluster: hp.Cluster) -> int:
    hp.trap_exits(True)  # exit signals arrive as hp.ExitSignal messages
    me, alive = hp.self_pid(), list(cluster.peers)
    todo, done = list(range(N)), dict[int, int]()
    running: dict[hp.Pid, tuple[hp.NodeId, int]] = {}  # work process -> (node, item)
    while len(done) < N:
        while todo and alive:  # hand out the work, round robin
            node = alive[len(todo) % len(alive)]
            item = todo.pop()
            running[await hp.spawn_link(node, square, me, item)] = (node, item)
        msg: Any = await hp.expect((tuple, hp.ExitSignal), timeout=60)
        if msg is None:
            return 1  # no progress for a minute
        if isinstance(msg, tuple):  # a result
            done[running.pop(msg[0])[1]] = msg[1]
        elif msg.from_ in running:  # a work process died: its node went away, or a bug
            node, item = running.pop(msg.from_)
            todo.append(item)  # re-dispatch it
            if isinstance(msg.reason, hp.DiedDisconnect | hp.DiedNodeDown) and node in alive:
                alive.remove(node)
        elif msg.from_ in alive:  # a worker node went away (main is linked to each)
            alive.remove(msg.from_)
    print(f"sum of squares: {sum(done.values())} ({len(alive)} workers left)", flush=True)
    return 0
