"""Dask distributed: actor method round trip and task rate on a one-worker local cluster.

Role 0 (``solo``) starts a ``LocalCluster`` of one worker process with one thread,
listening on 127.0.0.1 without a dashboard, its scratch space in a temporary directory,
and closes both before returning.
``distributed`` is imported only here.
"""

from __future__ import annotations

import importlib
import tempfile
import time
from typing import Any

from .._pair import Peer


class Echo:
    """The actor: returns its argument."""

    def ping(self, x: Any) -> Any:
        return x


def noop(i: int) -> None:
    """A task that returns at once."""


def role(peer: Peer) -> dict[str, list[float]]:
    """Dask's figures by name; see the module docstring."""
    # Typed as Any: distributed is partly unannotated, and CI may not have it.
    distributed: Any = importlib.import_module("distributed")
    dask: Any = importlib.import_module("dask")
    p = peer.params
    runs = p["runs"]
    with (
        tempfile.TemporaryDirectory(prefix="hpcproc-bench-dask-") as scratch,
        dask.config.set({"temporary-directory": scratch}),
        distributed.LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            local_directory=scratch,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        actor = client.submit(Echo, actor=True).result()
        small = b"x" * 8
        for _ in range(p["warmup"]):
            actor.ping(small).result()
        rtts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            for _ in range(p["iters"]):
                actor.ping(small).result()
            rtts.append((time.perf_counter() - t0) / p["iters"])
        k = p["call_count"]
        tasks = []
        for run in range(runs):
            t0 = time.perf_counter()
            client.gather(client.map(noop, range(run * k, (run + 1) * k), pure=False))
            tasks.append(k / (time.perf_counter() - t0))
        return {"rtt": rtts, "tasks": tasks}
