"""``multiprocessing.Pipe`` at the process level: ``send`` / ``recv`` of Python objects.

Role 0 (``solo``) forks an echo process and times round trips of ``(tag, payload)``
tuples, pickled by the pipe as hpcproc pickles its messages: an 8-byte ``bytes`` payload
and a large numpy array.
"""

from __future__ import annotations

import multiprocessing
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from .._pair import Peer


def _echo(conn: Connection) -> None:
    while True:
        msg = conn.recv()
        if msg is None:
            break
        conn.send(msg)
    conn.close()


def _rtts(conn: Connection, msg: Any, iters: int, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        conn.send(msg)
        conn.recv()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(iters):
            conn.send(msg)
            conn.recv()
        out.append((time.perf_counter() - t0) / iters)
    return out


def role(peer: Peer) -> dict[str, list[float]]:
    """Round trips of a small and a big message; see the module docstring."""
    p = peer.params
    ctx = multiprocessing.get_context("fork")
    mine, theirs = ctx.Pipe()
    child = ctx.Process(target=_echo, args=(theirs,), daemon=True)
    child.start()
    try:
        small = _rtts(mine, ("rtt", b"x" * 8), p["iters"], p["runs"], p["warmup"])
        big_msg = ("big", np.zeros(p["big_size"], dtype=np.uint8))
        big = _rtts(mine, big_msg, p["big_iters"], p["runs"], 1)
        mine.send(None)
        return {"rtt": small, "big_rtt": big}
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join()
