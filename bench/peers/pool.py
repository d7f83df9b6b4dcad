"""``concurrent.futures.ProcessPoolExecutor`` task rate: one worker process, many tasks.

Role 0 (``solo``) starts a pool of one worker (two OS processes in all, as hpcproc's two
nodes), submits ``count`` tasks that return at once and waits for all of them.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import time

from .._pair import Peer


def noop() -> None:
    """A task that returns at once."""


def role(peer: Peer) -> dict[str, list[float]]:
    """Tasks per second of each run."""
    n, runs = peer.params["call_count"], peer.params["runs"]
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        pool.submit(noop).result()  # the worker is up
        rates = []
        for _ in range(runs):
            t0 = time.perf_counter()
            futures = [pool.submit(noop) for _ in range(n)]
            concurrent.futures.wait(futures)
            rates.append(n / (time.perf_counter() - t0))
    return {"tasks": rates}
