"""The ``otp`` suite: hpcproc.otp's behaviours against the plain process layer.

Rows (each baseline measured in the same run, in fresh OS processes):

* ``rtt`` local: ``otp.call`` round trip to a GenServer on the same node, against a
  plain ``send`` + ``expect`` round trip to an echo process of the same node.
* ``rtt`` over tcp and shm: the same between two nodes in two OS processes; target
  ratio <= 1.5 (timed runs of the two alternate).
* ``call_rate`` (8 B requests) across nodes with 1 and 16 concurrent callers (local processes each
  making its share of the calls in turn); 1 caller against ``1 / process rtt``, 16
  against the target 20000 calls/s.
* ``restart_latency``: a supervised local GenServer is killed; the time until a call
  to its registered name is answered by the restarted child; target 2 ms (median).
* ``task_rate``: ``otp.map`` of a tiny function over 3 worker nodes (node servers in
  3 OS processes, tcp), against ``ProcessPoolExecutor(3).map(chunksize=1)`` of the
  same function; target ratio <= 0.2 (5x the task rate).
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from ._pair import Peer, run_pair
from ._records import Record, median, record
from ._suites import SuiteOptions

__all__ = ["local_role", "map_role", "pair_role", "run", "tiny"]

SUITE = "otp"
TARGET_CALL_RATE = 20_000.0
TARGET_RESTART_US = 2000.0
ROOT = Path(__file__).resolve().parent.parent


def tiny(x: int) -> int:
    """The tiny task of the map rows."""
    return x + 1


def _server_class() -> Any:
    from hpcproc import otp

    class Echo(otp.GenServer):
        """Answers every call with its request."""

        async def handle_call(self, request: Any, caller: Any) -> Any:
            return request

    return Echo


Echo = _server_class()


async def _echo() -> None:
    import hpcproc as hp

    while True:
        msg = await hp.expect()
        if msg == "stop":
            return
        await hp.send(msg[0], msg[1])


async def _alternate(server: Any, echo: Any, params: dict[str, Any]) -> dict[str, list[float]]:
    """Timed runs of call and plain round trips, alternating."""
    import hpcproc as hp
    from hpcproc import otp

    me = hp.self_pid()
    send, expect, call = hp.send, hp.expect, otp.call
    payload = b"x" * 8  # the same 8 B request and reply both ways
    msg = (me, payload)
    iters, runs = params["iters"], params["runs"]
    for _ in range(iters // 4 + 1):
        await call(server, payload)
        await send(echo, msg)
        await expect()
    out: dict[str, list[float]] = {"call": [], "plain": []}
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(iters):
            await send(echo, msg)
            await expect()
        out["plain"].append((time.perf_counter() - t0) / iters)
        t0 = time.perf_counter()
        for _ in range(iters):
            await call(server, payload)
        out["call"].append((time.perf_counter() - t0) / iters)
    return out


async def _caller(parent: Any, server: Any, count: int) -> None:
    import hpcproc as hp
    from hpcproc import otp

    payload = b"x" * 8
    for _ in range(count):
        await otp.call(server, payload)
    await hp.send(parent, "called")


async def _call_rates(server: Any, params: dict[str, Any]) -> dict[str, list[float]]:
    import hpcproc as hp

    me = hp.self_pid()
    out: dict[str, list[float]] = {}
    for callers in (1, 16):
        k = params["calls"]
        rates = []
        for _ in range(params["runs"]):
            t0 = time.perf_counter()
            for i in range(callers):
                hp.spawn_local(_caller, me, server, k // callers + (i < k % callers))
            for _ in range(callers):
                assert await hp.expect(str, timeout=120) == "called"
            rates.append(k / (time.perf_counter() - t0))
        out[f"callers{callers}"] = rates
    return out


async def pair_role(peer: Peer) -> dict[str, Any] | None:
    """Role 1 serves a GenServer and an echo process; role 0 measures."""
    import hpcproc as hp
    from hpcproc import otp
    from hpcproc.transports import create

    transport = create(peer.params["transport"])
    try:
        async with hp.Node(transport) as node:
            if peer.role == 1:

                async def serve() -> None:
                    hp.register("echo", hp.spawn_local(_echo))
                    await otp.start(Echo, name="server")
                    hp.register("main", hp.self_pid())
                    peer.publish("address", base64.b64encode(node.node_id.address).decode())
                    await hp.expect(str)  # "stop" from role 0

                await node.run(serve)
                return None
            other = hp.NodeId(base64.b64decode(await peer.alookup("address")))

            async def measure() -> dict[str, Any]:
                echo = await hp.whereis_remote(other, "echo", timeout=60)
                server = await hp.whereis_remote(other, "server", timeout=60)
                assert echo is not None and server is not None
                result: dict[str, Any] = await _alternate(server, echo, peer.params)
                result.update(await _call_rates(server, peer.params))
                await hp.send(echo, "stop")
                await hp.nsend_remote(other, "main", "stop")
                return result

            return await node.run(measure)  # type: ignore[no-any-return]
    finally:
        await transport.close()


async def _restart_latencies(count: int) -> list[float]:
    import hpcproc as hp
    from hpcproc import otp

    sup = await otp.start_supervisor(
        [otp.ChildSpec("echo", Echo, name="restarted")], max_restarts=count + 10, max_seconds=3600
    )
    out = []
    for _ in range(count):
        pid = hp.whereis("restarted")
        assert pid is not None
        t0 = time.perf_counter()
        await hp.kill(pid, "benchmark crash")
        while True:
            try:
                await otp.call("restarted", b"x", timeout=5)
            except otp.ServerDown:
                await asyncio.sleep(0)  # let the supervisor run
                continue
            if hp.whereis("restarted") != pid:
                break
        out.append(time.perf_counter() - t0)
    await otp.stop(sup)
    return out


async def local_role(peer: Peer) -> dict[str, Any]:
    """One node: local call vs local plain round trip; supervisor restart latency."""
    import hpcproc as hp
    from hpcproc import otp

    transport = hp.transports.create("inmemory")
    async with hp.Node(transport) as node:

        async def measure() -> dict[str, Any]:
            server = await otp.start(Echo)
            echo = hp.spawn_local(_echo)
            result: dict[str, Any] = await _alternate(server, echo, peer.params)
            await hp.send(echo, "stop")
            await otp.stop(server)
            result["restart"] = await _restart_latencies(peer.params["restarts"])
            return result

        out: dict[str, Any] = await node.run(measure)
    await transport.close()
    return out


async def _map_rates(nodes: list[Any], n: int, runs: int) -> list[float]:
    from hpcproc import otp

    await otp.map(tiny, range(100), nodes=nodes)  # warm up connections and imports
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = await otp.map(tiny, range(n), nodes=nodes)
        rates.append(n / (time.perf_counter() - t0))
        assert out[-1] == n
    return rates


def map_role(peer: Peer) -> dict[str, Any]:
    """otp.map over 3 node servers vs ProcessPoolExecutor(3), runs alternating."""
    import hpcproc as hp
    from hpcproc.testing.node_server import NodeServerProcess
    from hpcproc.transports import create

    cookie = os.environ["HPCPROC_COOKIE"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    n, runs = peer.params["tasks"], peer.params["runs"]
    servers = [
        NodeServerProcess("tcp", {"cookie": cookie}, env=env, cwd=str(ROOT)) for _ in range(3)
    ]
    out: dict[str, list[float]] = {"otp": [], "pool": []}
    try:
        with ProcessPoolExecutor(max_workers=3) as pool:
            list(pool.map(tiny, range(100), chunksize=1))
            for _ in range(runs):
                t0 = time.perf_counter()
                list(pool.map(tiny, range(n), chunksize=1))
                out["pool"].append(n / (time.perf_counter() - t0))

                async def one_run() -> list[float]:
                    transport = create("tcp", cookie=cookie)
                    try:
                        async with hp.Node(transport) as node:
                            nodes = [s.node_id for s in servers]
                            return await node.run(_map_rates, nodes, n, 1)  # type: ignore[no-any-return]
                    finally:
                        await transport.close()

                out["otp"].extend(asyncio.run(one_run()))
    finally:
        for server in servers:
            server.stop()
    return out


def run(options: SuiteOptions) -> list[Record]:
    """Measure hpcproc.otp; see the module docstring. ``options.transport`` and shm
    are the cross-process transports (tcp and shm by default).

    Raises:
        PairError: a measuring process failed.
    """
    quick = options.quick or options.smoke
    rounds = 1 if quick else 3
    params: dict[str, Any] = {
        "iters": 500 if quick else 2000,
        "runs": 5 if quick else 9,
        "calls": 5000 if quick else 20000,
        "restarts": 50 if quick else 200,
        "tasks": 5000 if quick else 20000,
    }
    if options.smoke:
        params.update(iters=20, runs=1, calls=64, restarts=3, tasks=200)
    env = {"HPCPROC_COOKIE": os.environ.get("HPCPROC_COOKIE") or secrets.token_hex(16)}
    transports = [options.transport] + (["shm"] if options.transport == "tcp" else [])
    records: list[Record] = []
    local: dict[str, list[float]] = {"call": [], "plain": [], "restart": []}
    pairs: dict[str, dict[str, list[float]]] = {}
    maps: dict[str, list[float]] = {"otp": [], "pool": []}
    for _ in range(rounds):
        loc = run_pair("bench.otp:local_role", params, launch="solo", env=env)[0]
        for key in local:
            local[key].extend(loc[key])
        for name in transports:
            got = run_pair("bench.otp:pair_role", {**params, "transport": name}, env=env)[0]
            into = pairs.setdefault(name, {})
            for key, values in got.items():
                into.setdefault(key, []).extend(values)
        got = run_pair("bench.otp:map_role", params, launch="solo", env=env)[0]
        for key in maps:
            maps[key].extend(got[key])
    call_us, plain_us = median(local["call"]) * 1e6, median(local["plain"]) * 1e6
    records.append(record(SUITE, "local", "rtt", 8, call_us, "process rtt", plain_us))
    for name, got in pairs.items():
        call_us, plain_us = median(got["call"]) * 1e6, median(got["plain"]) * 1e6
        records.append(record(SUITE, name, "rtt", 8, call_us, "process rtt", plain_us))
        records.append(
            record(
                SUITE,
                name,
                "call_rate",
                8,
                median(got["callers1"]),
                "1 caller: 1 / process rtt",
                1e6 / plain_us,
            )
        )
        records.append(
            record(
                SUITE,
                name,
                "call_rate",
                8,
                median(got["callers16"]),
                "16 callers: target",
                TARGET_CALL_RATE,
            )
        )
    records.append(
        record(
            SUITE,
            "local",
            "restart_latency",
            0,
            median(local["restart"]) * 1e6,
            "target",
            TARGET_RESTART_US,
        )
    )
    records.append(
        record(
            SUITE,
            "tcp",
            "task_rate",
            0,
            median(maps["otp"]),
            "ProcessPoolExecutor",
            median(maps["pool"]),
        )
    )
    return records
