"""Scatter a numpy array over the worker nodes, compute on each, gather the results.

Run it with any launcher::

    python -m hpcproc.run --np 4 examples/scatter_gather.py:main     # on this machine
    srun -N 2 -n 8 python -m hpcproc.run examples/scatter_gather.py:main

Rank 0 splits an array into one chunk per worker, runs ``partial_sums`` on each
worker node (the chunk travels as an out-of-band frame, never pickled), gathers the
partial sums from its mailbox and checks the total against a local computation.
"""

from __future__ import annotations

import socket
from typing import Any

import numpy as np

import hpcproc as hp


async def partial_sums(master: hp.Pid, index: int, chunk: np.ndarray[Any, Any]) -> None:
    """On a worker: send ``master`` the sum of squares of ``chunk`` and this host."""
    await hp.send(master, (index, socket.gethostname(), float(np.square(chunk).sum()), chunk.size))


async def main(cluster: hp.Cluster) -> int:
    """Master: scatter, gather, verify; returns the exit status (0 when correct).

    Every worker process is monitored: one that dies (or whose node dies) makes
    ``main`` raise instead of waiting forever.
    """
    workers = list(cluster.peers) or [cluster.node.node_id]
    data = np.arange(1_000_000, dtype=np.float64) / 1000.0
    chunks = np.array_split(data, len(workers))
    me = hp.self_pid()
    for index, (node, chunk) in enumerate(zip(workers, chunks, strict=True)):
        await hp.spawn_monitor(node, partial_sums, me, index, chunk)
    results: dict[int, tuple[str, float, int]] = {}
    finished = 0
    while len(results) < len(workers) or finished < len(workers):
        msg = await hp.receive(
            hp.match(tuple, lambda m: m),
            hp.match(hp.ProcessMonitorNotification, lambda m: m),
        )
        if isinstance(msg, hp.ProcessMonitorNotification):
            if not isinstance(msg.reason, hp.DiedNormal):
                raise RuntimeError(f"worker {msg.pid} failed: {msg.reason!r}")
            finished += 1
        else:
            index, host, part, n = msg
            results[index] = (host, part, n)
    total = sum(part for _, part, _ in results.values())
    expected = float(np.square(data).sum())
    for index, node in enumerate(workers):
        host, part, n = results[index]
        print(
            f"scatter_gather: {cluster.describe_node(node)} ({host}) summed {n} values: {part:.6g}"
        )
    ok = bool(np.isclose(total, expected, rtol=1e-9))
    print(
        f"scatter_gather: {len(workers)} workers, total {total:.9g},"
        f" expected {expected:.9g}: {'OK' if ok else 'MISMATCH'}",
        flush=True,
    )
    return 0 if ok else 1
