"""Ray: actor method round trips (sync and async actors), pipelined calls, task
submission rate and a numpy argument round trip, on a local Ray instance.

Role 0 (``solo``) starts Ray itself (``ray.init`` with a private, dashboard-less local
instance in its own session directory) and shuts it down and removes that directory
before returning. ``ray`` is imported only here.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .._pair import Peer


def _timed(one: Callable[[], object], iters: int, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        one()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(iters):
            one()
        out.append((time.perf_counter() - t0) / iters)
    return out


def role(peer: Peer) -> dict[str, list[float]]:
    """Ray's figures by name; see the module docstring."""
    # Typed as Any: Ray's annotations differ between versions, and CI may not have Ray.
    ray: Any = importlib.import_module("ray")
    p = peer.params
    runs = p["runs"]
    # A private session directory (short: Ray puts unix sockets in it), removed after.
    session = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _temp_dir=session,
    )
    try:

        class _Echo:
            def ping(self, x: Any) -> Any:
                return x

        class _AsyncEcho:
            async def ping(self, x: Any) -> Any:
                return x

        def _noop() -> None:
            return None

        # Defined here, not at module level, so that Ray pickles them by value: its
        # workers need not import this module.
        noop = ray.remote(_noop)
        sync, asyn = ray.remote(_Echo).remote(), ray.remote(_AsyncEcho).remote()
        small = b"x" * 8
        out: dict[str, list[float]] = {}
        for name, actor in (("rtt_sync", sync), ("rtt_async", asyn)):

            def one(ping: Any = actor.ping.remote) -> None:
                ray.get(ping(small))

            out[name] = _timed(one, p["iters"], runs, p["warmup"])
        big = np.zeros(p["big_size"], dtype=np.uint8)
        ping = sync.ping.remote

        def one_big() -> None:
            ray.get(ping(big))

        out["big_rtt"] = _timed(one_big, p["big_iters"], runs, 1)
        n = p["pipeline_count"]
        out["pipelined"] = []
        for _ in range(runs):
            t0 = time.perf_counter()
            ray.get([ping(small) for _ in range(n)])
            out["pipelined"].append(n / (time.perf_counter() - t0))
        k = p["call_count"]
        ray.get(noop.remote())  # a worker is up
        out["tasks"] = []
        for _ in range(runs):
            t0 = time.perf_counter()
            ray.get([noop.remote() for _ in range(k)])
            out["tasks"].append(k / (time.perf_counter() - t0))
        return out
    finally:
        ray.shutdown()
        shutil.rmtree(session, ignore_errors=True)
