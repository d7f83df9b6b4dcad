"""A Mandelbrot set computed with ``otp.map`` that survives ``kill -9`` of a worker node.

Run it::

    python -m hpcproc.run --np 4 examples/mandelbrot_ft.py:main
    MANDELBROT_KILL_RANK=2 python -m hpcproc.run --np 4 examples/mandelbrot_ft.py:main

Rank 0 hands out one image row per task to the worker nodes (ranks 1-3); each row
comes back as a numpy array of escape counts (an out-of-band buffer, never pickled).
With ``MANDELBROT_KILL_RANK=r``, rank ``r`` SIGKILLs itself on its first row: its
unfinished rows are re-dispatched to the surviving workers, and the image is still
exact (checked against a local computation). Prints the estimated area of the set.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import numpy as np

import hpcproc as hp
from hpcproc import otp

WIDTH, HEIGHT, MAX_ITER = 600, 400, 200
X0, X1, Y0, Y1 = -2.0, 0.6, -1.15, 1.15


def row(y: int) -> np.ndarray[Any, Any]:
    """Escape counts of image row ``y`` (MAX_ITER for points in the set)."""
    if os.environ.get("MANDELBROT_KILL_RANK") == os.environ.get("HPCPROC_RANK"):
        os.kill(os.getpid(), signal.SIGKILL)  # the fault this example survives
    c = np.linspace(X0, X1, WIDTH) + 1j * (Y0 + (Y1 - Y0) * y / (HEIGHT - 1))
    z = np.zeros_like(c)
    counts = np.full(WIDTH, MAX_ITER, dtype=np.int32)
    alive = np.ones(WIDTH, dtype=bool)
    for i in range(MAX_ITER):
        z[alive] = z[alive] ** 2 + c[alive]
        escaped = alive & (np.abs(z) > 2.0)
        counts[escaped] = i
        alive &= ~escaped
    return counts


async def compute(report: hp.Pid, nodes: list[hp.NodeId]) -> None:
    """The map, in a process of its own (main is linked to every worker node)."""
    rows = await otp.map(row, range(HEIGHT), nodes=nodes)
    await hp.send(report, ("image", np.stack(rows)))


async def main(cluster: Any) -> int:
    """Compute the image on the workers, verify it, print the area; 0 when exact."""
    workers = list(cluster.peers) or [cluster.node.node_id]
    hp.spawn_local(compute, hp.self_pid(), workers)
    while True:
        try:
            msg = await hp.receive(hp.match(tuple), timeout=600)
        except hp.NodeLinkException as exc:  # run.py links main to every worker node
            print(f"mandelbrot_ft: lost {cluster.describe_node(exc.node)}; work re-dispatched")
            continue
        break
    if msg is None:
        print("mandelbrot_ft: no image within 600 s")
        return 1
    image = msg[1]
    os.environ.pop("MANDELBROT_KILL_RANK", None)
    expected = np.stack([row(y) for y in range(HEIGHT)])
    inside = int((image == MAX_ITER).sum())
    area = inside / image.size * (X1 - X0) * (Y1 - Y0)
    exact = bool(np.array_equal(image, expected))
    print(
        f"mandelbrot_ft: {HEIGHT} rows on {len(workers)} workers, area ~ {area:.4f}, exact={exact}"
    )
    return 0 if exact else 1
