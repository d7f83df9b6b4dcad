"""The ``process`` suite: the process layer against the layers and libraries below it.

Rows (each with a baseline measured in the same run, in fresh OS processes):

* ``rtt`` (8 B payload): process-to-process round trip between two nodes in two OS
  processes (``send`` + ``expect`` on both sides), against the raw transport's round
  trip (``bench.transport:hpcproc_role``, the transport suite's own measurement).
  Target: ratio <= 2.0.
* ``rtt`` (4 KiB): the same with a numpy array in the message, ``(pid, float64[512])``,
  against the raw transport's round trip of one 4 KiB frame: what the process layer
  and its serializer add to a message that carries an array.
* ``msg_rate`` between two nodes: one process sends N small messages one way to a
  process on the other node; against the raw transport sending N one-frame messages
  one way.
* ``msg_rate`` within one node: the same between two processes of one node; against
  ``asyncio.Queue`` between two tasks, and the target 200000/s.
* ``spawn_rate`` local: ``spawn_local`` of 20000 processes that end at once, until
  all ended; against ``asyncio.create_task`` of 20000 coroutines, and the target
  20000/s.
* ``spawn_rate`` remote: sequential ``await spawn(other node, fn)``; against one
  process round trip per spawn (the best a request-reply spawn can do).
* ``bytes_per_process``: RSS growth of 100000 idle processes (each suspended in
  ``expect``) divided by 100000; against bare asyncio tasks suspended on a future,
  and the target 2048 bytes.

The ``rtt`` row and its raw-transport baseline run at once, their runs taking turns
(:func:`bench.run_pairs`; one after the other under ``mpiexec``, whose waiting ranks
busy-poll). The other rows alternate baseline and hpcproc pairs. The median is
reported.

:func:`pair_role` and :func:`local_role` also measure the figures :mod:`bench.peers`
compares with other runtimes when their parameters ask for them (``peer_extras``,
``local_rtt_step``).
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import time
from dataclasses import asdict, replace
from typing import Any

from ._pair import Job, Peer, run_pair, run_pairs
from ._records import Record, median, record
from ._suites import SuiteOptions
from ._timing import Step, Turn, _no_turn
from .transport import _launch_for

__all__ = [
    "local_role",
    "memory_role",
    "noop",
    "pair_role",
    "raw_rate_role",
    "run",
]

SUITE = "process"
RTT_SIZE = 8
#: Bytes of the array in the ``rtt`` row of a message with an array.
ARRAY_SIZE = 4096
MEMORY_PROCESSES = 100_000
TARGET_LOCAL_RATE = 200_000.0
TARGET_SPAWN_RATE = 20_000.0
TARGET_BYTES = 2048.0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def noop() -> None:
    """A process that ends at once."""


async def _idle() -> None:
    import hpcproc as hp

    await hp.expect(bytes)


async def _echo() -> None:
    import hpcproc as hp

    while True:
        msg = await hp.expect()
        if msg == "stop":
            return
        await hp.send(msg[0], msg[1])


async def _sink() -> None:
    """Counts ``n`` messages after a ``("count", n, reply)`` header, then replies."""
    import hpcproc as hp

    while True:
        header = await hp.expect(tuple)
        if header[0] == "stop":
            return
        _, n, reply = header
        expect = hp.expect
        for _ in range(n):
            await expect()
        await hp.send(reply, "done")


# ---------------------------------------------------------------------- two nodes


async def pair_role(peer: Peer) -> dict[str, Any] | None:
    """Role 1 serves ``echo`` and ``sink``; role 0 measures rtt, one-way rate, spawns."""
    import hpcproc as hp
    from hpcproc.transports import create

    transport = create(peer.params["transport"])
    try:
        async with hp.Node(transport) as node:
            if peer.role == 1:

                async def serve() -> None:
                    hp.register("echo", hp.spawn_local(_echo))
                    hp.register("sink", hp.spawn_local(_sink))
                    hp.register("server", hp.self_pid())
                    peer.publish("address", base64.b64encode(node.node_id.address).decode())
                    # "stop" from role 0, or role 0's end without it (killed, with
                    # nobody left to kill this role: started by a rank of bench.cluster).
                    measurer = hp.NodeId(base64.b64decode(await peer.alookup("address")))
                    await hp.monitor_node(measurer)
                    await hp.expect((str, hp.NodeMonitorNotification))

                await node.run(serve)
                return None
            peer.publish("address", base64.b64encode(node.node_id.address).decode())
            other = hp.NodeId(base64.b64decode(await peer.alookup("address")))
            result: dict[str, Any] = await node.run(_measure_pair, other, peer.params, peer.turn)
            return result
    finally:
        await transport.close()


async def _measure_pair(other: Any, params: dict[str, Any], turn: Turn) -> dict[str, Any]:
    import hpcproc as hp

    step = Step(**params["rtt_step"])
    me = hp.self_pid()
    echo = await hp.whereis_remote(other, "echo", timeout=60)
    sink = await hp.whereis_remote(other, "sink", timeout=60)
    assert echo is not None and sink is not None
    # Each run in its turn: the cluster suite's rank 0 takes turns with this pair.
    arrays = Step(**params["array_step"]) if "array_step" in params else None
    settle = params.get("rtt_settle_s", 0.0)
    rtts = await _rtts(echo, (me, b"x" * RTT_SIZE), step, settle, turn, last=arrays is None)
    if arrays is not None:
        import numpy as np

        msg = (me, np.zeros(arrays.size // 8))
        array_rtts = await _rtts(echo, msg, arrays, 0.0, turn)
    send, expect = hp.send, hp.expect
    rates = []
    n = params["rate_count"]
    for _ in range(params["rate_runs"]):
        t0 = time.perf_counter()
        await send(sink, ("count", n, me))
        for i in range(n):
            await send(sink, i)
        assert await expect(str, timeout=120) == "done"
        rates.append(n / (time.perf_counter() - t0))
    spawns = []
    k = params["spawn_count"]
    for _ in range(params["rate_runs"]):
        t0 = time.perf_counter()
        for _ in range(k):
            await hp.spawn(other, noop)
        spawns.append(k / (time.perf_counter() - t0))
    result: dict[str, Any] = {"rtt": rtts, "rate": rates, "spawn": spawns}
    if arrays is not None:
        result["array_rtt"] = array_rtts
    if "peer_extras" in params:
        result.update(await _measure_extras(echo, other, params["peer_extras"]))
    await send(echo, "stop")
    await send(sink, ("stop",))
    await hp.nsend_remote(other, "server", "stop")
    return result


async def _caller(parent: Any, other: Any, count: int) -> None:
    import hpcproc as hp

    for _ in range(count):
        await hp.call(other, noop)
    await hp.send(parent, "called")


async def _measure_extras(echo: Any, other: Any, extras: dict[str, Any]) -> dict[str, Any]:
    """The figures only :mod:`bench.peers` compares: big round trip, pipelined
    round trips, rate of ``call`` from concurrent processes (one value per run each)."""
    import numpy as np

    import hpcproc as hp

    me = hp.self_pid()
    send, expect = hp.send, hp.expect
    runs = extras["runs"]
    big = (me, np.zeros(extras["big_size"], dtype=np.uint8))
    await send(echo, big)
    await expect()
    big_rtts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(extras["big_iters"]):
            await send(echo, big)
            await expect()
        big_rtts.append((time.perf_counter() - t0) / extras["big_iters"])
    msg = (me, b"x" * RTT_SIZE)
    n = extras["pipeline_count"]
    pipelined = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(n):
            await send(echo, msg)
        for _ in range(n):
            await expect()
        pipelined.append(n / (time.perf_counter() - t0))
    # ``callers`` local processes each make their share of the calls one after the other.
    k, callers = extras["call_count"], extras["callers"]
    calls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for i in range(callers):
            hp.spawn_local(_caller, me, other, k // callers + (i < k % callers))
        for _ in range(callers):
            assert await expect(str, timeout=120) == "called"
        calls.append(k / (time.perf_counter() - t0))
    return {"big_rtt": big_rtts, "pipelined": pipelined, "calls": calls}


async def raw_rate_role(peer: Peer) -> dict[str, Any] | None:
    """One-way rate of the raw transport: N one-frame messages, then one reply."""
    from hpcproc.transports import ConnectionOpened, Received, create

    transport = create(peer.params["transport"])
    n = peer.params["rate_count"]
    runs = peer.params["rate_runs"]
    try:
        endpoint = await transport.new_endpoint()
        if peer.role == 1:
            peer.publish("address", base64.b64encode(endpoint.address).decode())
            back = None
            for _ in range(runs):
                count = 0
                while count < n:
                    event = await endpoint.receive()
                    if isinstance(event, Received):
                        count += 1
                    elif isinstance(event, ConnectionOpened) and back is None:
                        back = await endpoint.connect(event.remote_address)
                assert back is not None
                await back.send([b"done"])
            return None
        address = base64.b64decode(await peer.alookup("address"))
        conn = await endpoint.connect(address)  # type: ignore[arg-type]
        frames = [b"12345678"]
        rates = []
        for _ in range(runs):
            t0 = time.perf_counter()
            for _ in range(n):
                await conn.send(frames)
            while not isinstance(await endpoint.receive(), Received):
                pass
            rates.append(n / (time.perf_counter() - t0))
        return {"rate": rates}
    finally:
        await transport.close()


# ---------------------------------------------------------------------- one node


async def local_role(peer: Peer) -> dict[str, Any]:
    """Within one node: message rate and spawn rate, with asyncio baselines."""
    import hpcproc as hp

    n = peer.params["local_count"]
    k = peer.params["spawn_count_local"]
    runs = peer.params["rate_runs"]
    out: dict[str, list[float]] = {"rate": [], "queue": [], "spawn": [], "task": []}
    transport = hp.transports.create("inmemory")
    async with hp.Node(transport) as node:

        async def measure() -> None:
            me = hp.self_pid()
            sink = hp.spawn_local(_sink)
            send = hp.send
            if "local_rtt_step" in peer.params:  # for bench.peers only
                out["rtt"] = await _local_rtt(Step(**peer.params["local_rtt_step"]))
            for _ in range(runs):
                # asyncio.Queue between two tasks: the floor of any mailbox.
                queue: asyncio.Queue[Any] = asyncio.Queue()

                async def drain(q: asyncio.Queue[Any]) -> None:
                    get = q.get
                    for _ in range(n):
                        await get()

                t0 = time.perf_counter()
                task = asyncio.ensure_future(drain(queue))
                put = queue.put_nowait
                for i in range(n):
                    put(i)
                    if i % 1024 == 0:
                        await asyncio.sleep(0)
                await task
                out["queue"].append(n / (time.perf_counter() - t0))

                t0 = time.perf_counter()
                await send(sink, ("count", n, me))
                for i in range(n):
                    await send(sink, i)
                    if i % 1024 == 0:
                        await asyncio.sleep(0)
                assert await hp.expect(str, timeout=120) == "done"
                out["rate"].append(n / (time.perf_counter() - t0))

                t0 = time.perf_counter()
                tasks = [asyncio.ensure_future(noop()) for _ in range(k)]
                await asyncio.wait(tasks)
                out["task"].append(k / (time.perf_counter() - t0))

                t0 = time.perf_counter()
                local = node.local_process
                spawned = [local(hp.spawn_local(noop).lid) for _ in range(k)]
                await asyncio.wait([p for p in spawned if p is not None])
                out["spawn"].append(k / (time.perf_counter() - t0))
            await send(sink, ("stop",))

        await node.run(measure)
    await transport.close()
    return out


async def _local_rtt(step: Step) -> list[float]:
    """Round trips between this process and an echo process of the same node."""
    import hpcproc as hp

    echo = hp.spawn_local(_echo)
    rtts = await _rtts(echo, (hp.self_pid(), b"x" * RTT_SIZE), step)
    await hp.send(echo, "stop")
    return rtts


async def _rtts(
    echo: Any,
    msg: Any,
    step: Step,
    settle: float = 0.0,
    turn: Turn = _no_turn,
    *,
    last: bool = True,
) -> list[float]:
    """Seconds per round trip of ``msg`` to ``echo`` and back, one figure per run,
    after ``step.warmup`` round trips and at least ``settle`` seconds of them. Each
    run, the warm-up with the first, happens inside ``turn()`` (see
    :func:`bench.time_steps`); ``last``: these are the last runs that take turns (then
    one empty turn follows, see below)."""
    import hpcproc as hp

    send, expect = hp.send, hp.expect
    rtts = []
    for run in range(step.runs):
        with turn():
            if run == 0:
                settled = time.perf_counter() + settle
                done = 0
                while done < step.warmup or time.perf_counter() < settled:
                    await send(echo, msg)
                    await expect()
                    done += 1
            t0 = time.perf_counter()
            for _ in range(step.iters):
                await send(echo, msg)
                await expect()
            rtts.append((time.perf_counter() - t0) / step.iters)
    if last:
        with turn():
            pass  # so that the other side's last run ends before this side goes on
    return rtts


async def memory_role(peer: Peer) -> dict[str, Any]:
    """RSS growth per idle process (``kind="process"``) or per bare task (``"task"``)."""
    import gc

    import hpcproc as hp

    n = int(peer.params["processes"])
    transport = hp.transports.create("inmemory")
    async with hp.Node(transport) as node:

        async def measure() -> float:
            loop = asyncio.get_running_loop()
            keep: list[Any] = []
            gc.collect()
            before = _rss()
            if peer.params["kind"] == "process":
                for _ in range(n):
                    keep.append(hp.spawn_local(_idle))
            else:

                async def bare(fut: asyncio.Future[None]) -> None:
                    await fut

                for _ in range(n):
                    keep.append(asyncio.ensure_future(bare(loop.create_future())))
            # Let every process reach its first suspension.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            gc.collect()
            per = (_rss() - before) / n
            for item in keep:
                if isinstance(item, hp.Pid):
                    proc = node.local_process(item.lid)
                    if proc is not None:
                        proc.cancel()
                else:
                    item.cancel()
            return per

        per_process = float(await node.run(measure))
    await transport.close()
    return {"bytes": per_process}


# ---------------------------------------------------------------------- suite


def run(options: SuiteOptions) -> list[Record]:
    """Measure the process layer on ``options.transport``; see the module docstring.

    Raises:
        PairError: a measuring process failed.
    """
    name = options.transport
    quick = options.quick or options.smoke
    rounds = 1 if quick else 3
    if options.smoke:
        rtt_step = Step(RTT_SIZE, 20, 1, 5)
    else:
        rtt_step = Step(RTT_SIZE, 200 if quick else 500, 11 if quick else 21, 100)
    array_step = replace(rtt_step, size=ARRAY_SIZE)
    params: dict[str, Any] = {
        "transport": name,
        "rtt_step": asdict(rtt_step),
        "array_step": asdict(array_step),
        # The raw transport's round trips: as many runs of each size, in this order.
        "steps": [asdict(rtt_step), asdict(array_step)],
        "rate_count": 5000 if quick else 20000,
        "rate_runs": 3 if quick else 5,
        "spawn_count": 300 if quick else 1000,
        "local_count": 100_000 if quick else 300_000,
        # Batches of 20000: larger batches measure the cycle collector walking
        # every live task more than the cost of a spawn (for asyncio tasks too).
        "spawn_count_local": 20_000,
    }
    memory_processes = MEMORY_PROCESSES
    if options.smoke:
        params.update(
            rate_count=200,
            rate_runs=1,
            spawn_count=20,
            local_count=2000,
            spawn_count_local=2000,
        )
        memory_processes = 2000
    env = {"HPCPROC_COOKIE": os.environ.get("HPCPROC_COOKIE") or secrets.token_hex(16)}
    # The two nodes must be MPI ranks for the mpi transport.
    launch = _launch_for(name)
    raw_rtt: list[float] = []
    raw_rate: list[float] = []
    raw_array_rtt: list[float] = []
    ours: dict[str, list[float]] = {"rtt": [], "array_rtt": [], "rate": [], "spawn": []}
    local: dict[str, list[float]] = {"rate": [], "queue": [], "spawn": [], "task": []}
    # The round trips alone in the pairs that take turns, the rates and spawns in a
    # pair of their own (beside nothing: not while the other pair shuts down).
    rtt_only = {**params, "rate_runs": 0}
    no_rtt = {**params, "rtt_step": asdict(replace(rtt_step, runs=0, warmup=0))}
    del no_rtt["array_step"]
    for _ in range(rounds):
        # The two round trips take turns run by run (their pairs run at once):
        # measured one after the other, a slow minute of this VM fell on one side
        # only (ratios of 0.71-1.83 in consecutive runs). Ours is the first job: its
        # last, empty turn (see _rtts) then needs nobody after it. Not under mpiexec,
        # whose waiting ranks would busy-poll through the other pair's turns.
        mine, raw = (
            per_role[0]
            for per_role in run_pairs(
                [
                    Job("bench.process:pair_role", launch),
                    Job("bench.transport:hpcproc_role", launch),
                ],
                rtt_only,
                env=env,
                interleave=launch != "mpiexec",
            )
        )
        ours["rtt"].extend(mine["rtt"])
        ours["array_rtt"].extend(mine["array_rtt"])
        raw_rtt.extend(raw[str(RTT_SIZE)])
        raw_array_rtt.extend(raw[str(ARRAY_SIZE)])
        raw_rate.extend(
            run_pair("bench.process:raw_rate_role", params, launch=launch, env=env)[0]["rate"]
        )
        rest = run_pair("bench.process:pair_role", no_rtt, launch=launch, env=env)[0]
        ours["rate"].extend(rest["rate"])
        ours["spawn"].extend(rest["spawn"])
        loc = run_pair("bench.process:local_role", params, launch="solo", env=env)[0]
        for key in local:
            local[key].extend(loc[key])
    mem_proc = run_pair(
        "bench.process:memory_role",
        {"kind": "process", "processes": memory_processes},
        launch="solo",
        env=env,
    )[0]["bytes"]
    mem_task = run_pair(
        "bench.process:memory_role",
        {"kind": "task", "processes": memory_processes},
        launch="solo",
        env=env,
    )[0]["bytes"]
    rtt_us, raw_us = median(ours["rtt"]) * 1e6, median(raw_rtt) * 1e6
    spawn_local = median(local["spawn"])
    local_rate = median(local["rate"])
    return [
        record(SUITE, name, "rtt", RTT_SIZE, rtt_us, f"raw {name} transport", raw_us),
        record(
            SUITE,
            name,
            "rtt",
            ARRAY_SIZE,
            median(ours["array_rtt"]) * 1e6,
            f"raw {name} transport",
            median(raw_array_rtt) * 1e6,
        ),
        record(
            SUITE,
            name,
            "msg_rate",
            RTT_SIZE,
            median(ours["rate"]),
            f"raw {name} one-way",
            median(raw_rate),
        ),
        record(SUITE, "local", "msg_rate", 0, local_rate, "asyncio.Queue", median(local["queue"])),
        record(SUITE, "local", "msg_rate", 0, local_rate, "target", TARGET_LOCAL_RATE),
        record(SUITE, "local", "spawn_rate", 0, spawn_local, "asyncio task", median(local["task"])),
        record(SUITE, "local", "spawn_rate", 0, spawn_local, "target", TARGET_SPAWN_RATE),
        record(
            SUITE, name, "spawn_rate", 0, median(ours["spawn"]), "1 / process rtt", 1e6 / rtt_us
        ),
        record(SUITE, "local", "bytes_per_process", 0, mem_proc, "asyncio task", mem_task),
        record(SUITE, "local", "bytes_per_process", 0, mem_proc, "target", TARGET_BYTES),
    ]
