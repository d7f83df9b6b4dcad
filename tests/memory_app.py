"""An application for the bounded-memory tests: run under ``python -m hpcproc.run``.

``main`` sends a large numpy array to an echo process on the other node and back,
``ROUNDS`` times, drops every reference, and prints one line per node::

    rss <rank> <before MiB> <after MiB> <peak MiB>

where *before* is RSS (anon + shmem, ``/proc/self/status``) after a small warm-up
exchange and before the array exists, and *after* the lowest value seen within
``SETTLE_S`` once everything was dropped (the shm pool returns idle segments after
``HPCPROC_SHM_POOL_IDLE`` seconds). ``HPCPROC_MEM_MIB`` sets the array size.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from typing import Any

import numpy as np

import hpcproc as hp

ROUNDS = 8
SETTLE_S = 30.0
WITHIN_MIB = 64


def rss_mib() -> int:
    """Anonymous plus shared-memory resident pages of this process, in MiB."""
    total = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssShmem:")):
                total += int(line.split()[1])
    return total // 1024


def _line(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def _settle(before: int) -> int:
    """The lowest RSS seen until it is back within bounds or ``SETTLE_S`` passed."""
    gc.collect()
    low = rss_mib()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_S
    while low > before + WITHIN_MIB // 2 and loop.time() < deadline:
        await asyncio.sleep(0.2)  # polling a condition with a deadline, not a sync
        gc.collect()
        low = min(low, rss_mib())
    return low


async def echo(master: hp.Pid, rank: int) -> None:
    """Send back every array; on ``"stop"``, drop everything and report."""
    await hp.send(master, "warm")
    before = rss_mib()
    await hp.send(master, before)
    peak = before
    while True:
        msg = await hp.expect()
        if isinstance(msg, np.ndarray):
            await hp.send(master, msg)
            peak = max(peak, rss_mib())
            del msg
            continue
        break
    after = await _settle(before)
    _line(f"rss {rank} {before} {after} {peak}")
    await hp.send(master, "reported")


async def main(cluster: Any) -> int:
    mib = int(os.environ.get("HPCPROC_MEM_MIB", "256"))
    me = hp.self_pid()
    peer = await hp.spawn(cluster.peers[0], echo, me, 1)
    assert await hp.expect(str) == "warm"
    await hp.expect(int)  # the peer measured its baseline
    gc.collect()
    before = rss_mib()
    peak = before
    a = np.ones(mib * 2**20 // 8)
    for _ in range(ROUNDS):
        await hp.send(peer, a)
        b = await hp.expect(np.ndarray, timeout=120)
        peak = max(peak, rss_mib())
        del b
    del a
    await hp.send(peer, "stop")
    after = await _settle(before)
    _line(f"rss 0 {before} {after} {peak}")
    assert await hp.expect(str, timeout=SETTLE_S + 60) == "reported"
    return 0


#: Message sizes of the soak, cycled (bytes): small, medium, pooled, large.
SOAK_SIZES = (100, 64 << 10, 3 << 20, 1 << 10, 20 << 20, 700 << 10, 64 << 20, 8 << 20)


async def soak_echo(master: hp.Pid) -> None:
    """Send back every message until ``"stop"``."""
    while True:
        msg = await hp.expect()
        if isinstance(msg, str):
            return
        await hp.send(master, msg)
        del msg


async def soak(cluster: Any) -> int:
    """Echo mixed sizes for ``HPCPROC_SOAK_S`` seconds; print the RSS series.

    Prints ``series <MiB> <MiB> ...``: rank 0's RSS (anon + shmem) once a second.
    """
    seconds = float(os.environ.get("HPCPROC_SOAK_S", "15"))
    me = hp.self_pid()
    peer = await hp.spawn(cluster.peers[0], soak_echo, me)
    loop = asyncio.get_running_loop()
    start = loop.time()
    next_sample = start
    series: list[int] = []
    i = 0
    while loop.time() - start < seconds:
        n = SOAK_SIZES[i % len(SOAK_SIZES)]
        i += 1
        await hp.send(peer, np.full(n, i % 251, dtype=np.uint8))
        back = await hp.expect(np.ndarray, timeout=120)
        assert back.nbytes == n and back[-1] == i % 251
        del back
        if loop.time() >= next_sample:
            series.append(rss_mib())
            next_sample += 1.0
    await hp.send(peer, "stop")
    _line(f"messages {i}")
    _line("series " + " ".join(map(str, series)))
    return 0
