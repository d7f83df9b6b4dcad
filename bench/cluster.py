"""The ``cluster`` suite: collectives written with processes against mpi4py's, and start-up.

Runs a real job: under ``srun`` on the Slurm cluster when one answers (the multi-host
test cluster of ``tests/slurm/up.sh``: 2 hosts x 2 ranks for the collectives), else
locally under ``mpiexec -n N`` (``--np N``, default 4; ``--np`` also forces the local
run). The ranks are started by ``python -m hpcproc.run --rendezvous mpi`` (so MPI is
initialised in every rank through :func:`hpcproc.mpi_init.import_mpi`, and the same
ranks form ``MPI.COMM_WORLD``) over the suite's transport (default ``auto``: per-peer
routing, shm to the ranks of the same host and tcp to the others). Rank 0 spawns one
measuring process on every other rank; every row is timed on rank 0 from one barrier
to the next around ``rounds`` operations (the barrier is MPI's ``Ibarrier``, polled
without blocking the event loop), hpcproc and mpi4py interleaved run by run, median
reported, after an untimed warm-up of each (a tenth of the all-to-all rounds, one
operation of the other collectives: connections open on first use). The barrier
itself is slow on an oversubscribed machine (4 ranks on this machine's 2 CPUs:
3.3-4.2 ms per barrier, measured), and its cost is in both sides' figures, so every
timing spans enough operations that the two barriers are a small share of it: 1000
all-to-all rounds (``--quick``; 2000 without), 3 scatter/gathers and allreduces (5).
With 50 rounds, as before, the barriers made most of the mpi4py all-to-all's figure
(about 150 of its 100-130 us per round against 13-25 us over 1000 rounds) and pulled
the ratio towards 1.

Rows:

* ``op_time`` all-to-all, 8 B per pair: every process sends one message to every
  other and receives one from each; against ``comm.Alltoall``. Target: ratio <= 3.
* ``op_time`` scatter/gather of a 64 MiB float64 array from rank 0 in ``N`` chunks
  and back; against ``comm.Scatter`` + ``comm.Gather``. Target: ratio <= 3.
* ``op_time`` ring allreduce (reduce-scatter then allgather, ``2(N-1)`` steps of one
  chunk to the right neighbour) of an 8 MiB float64 array; against
  ``comm.Allreduce``. Results are checked.
* ``rtt`` between rank 0 and a rank of the same host, inside the routed job (8 B,
  ``send`` + ``expect``, as the process suite measures it); against the process
  suite's own ``shm`` round trip (``bench.process``'s pair of nodes, started by rank 0
  on its host), the two taking turns run by run (20 runs of 300 round trips a side;
  see :func:`_paired_rtts`), each after at least ``RTT_SETTLE`` of warm-up. Target:
  within 15%. Only when a peer shares rank 0's host.
* ``node_rss``: the largest RSS of a rank once connected to all ``N - 1`` peers
  (after the all-to-all), against the same rank connected to rank 0 only (connections
  are opened lazily, on first use); and in the start-up runs, once every rank asked
  every other for its node stats, against the same rank at the entry of ``main``.
* ``startup`` for ``N`` = 4, 16, 64 ranks (``--quick`` too; ``--smoke``: 4): the time
  from starting ``srun`` (or ``--np``) to the last rank entering ``main`` (``--spmd``,
  every rank runs it); against the same launcher starting ``N`` bare
  ``python -c`` interpreters, and for 64 ranks the target of 20 s. Under Slurm the
  ranks are spread over every usable host of the default partition (at most
  ``HPCPROC_CLUSTER_HOSTS``), with ``--overcommit`` (more ranks than CPUs).

On the multi-host test cluster run it with ``UCX_NET_DEVICES=eth0`` (kept in the
jobs' environment, as ``UCX_TLS`` is): otherwise MPICH's UCX address lists every
device of the host, and under ``srun --mpi=pmi2`` (PMI-1, whose requests Slurm 22.05
cuts at 1024 bytes) some of its put lines are cut, and ``MPI_Init`` fails or hangs
(``mpi/pmi2: invalid client request`` in the job's output). Seen here: 9 of 9
collectives jobs failed without it, none of 12 with it; a bare ``import_mpi`` job passed
either way (the lines' length depends on uninitialised bytes in the address).

The baseline must cross hosts as hpcproc does. UCX (under MPICH) shares memory with
any process of the same boot id and IPC namespace, so on hosts that are namespaces of
one machine it needs one IPC namespace per host (``tests/slurm/up.sh`` gives each
slurmd its own); otherwise mpi4py's "cross-host" messages go through shared memory
(all-to-all, 2 hosts x 2 ranks: 30-40 us per round, against 90-150 us over the
network).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hpcproc.transports._busy_poll import CROWD_HOLD

from ._records import Record, median, record
from ._suites import SuiteOptions
from ._timing import Step, Turn, _no_turn

__all__ = ["job_main", "run", "startup_main"]

SUITE = "cluster"
A2A_SIZE = 8
SCATTER_BYTES = 64 << 20
ALLREDUCE_BYTES = 8 << 20
RTT_SIZE = 8
TARGET_RATIO = 3.0
TARGET_STARTUP_64 = 20.0
PARAMS_ENV = "HPCPROC_BENCH_CLUSTER"
#: The least time the round-trip row warms up (see _rtt): twice the poller's hold.
RTT_SETTLE = 2 * CROWD_HOLD
RESULT = "BENCH-CLUSTER "
STARTUP = "BENCH-STARTUP "
MEMORY = "BENCH-MEMORY "
CONNECT_ENV = "HPCPROC_BENCH_CONNECT"
JOB_TIMEOUT = 600.0
#: Seconds a start-up rank waits for another's node stats (well under JOB_TIMEOUT).
STATS_TIMEOUT = 120.0
#: Seconds the in-job baseline pair may take (well under JOB_TIMEOUT, so that its
#: error, not the job's timeout, is what a hang reports).
PAIR_TIMEOUT = 120.0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------- in the ranks


async def _barrier(comm: Any) -> None:
    """MPI barrier that keeps this node's event loop running (its transport must keep
    moving other ranks' messages while it waits)."""
    request = comm.Ibarrier()
    while not request.Test():
        await asyncio.sleep(0.0002)


class _Tags:
    """Message tags unique for the job (every rank counts alike)."""

    def __init__(self) -> None:
        self._next = 0

    def take(self, n: int = 1) -> int:
        first = self._next
        self._next += n
        return first


async def _take(kind: str, tag: int, *rest: Any) -> tuple[Any, ...]:
    """The message ``(kind, tag, *rest, payload)`` (selective receive: later rounds of
    a faster rank wait in the mailbox)."""
    import hpcproc as hp

    n = len(rest)

    def wanted(m: Any) -> bool:
        return type(m) is tuple and m[0] == kind and m[1] == tag and m[2 : 2 + n] == rest

    msg: tuple[Any, ...] = await hp.receive(hp.match_if(wanted), timeout=JOB_TIMEOUT)
    if msg is None:
        raise TimeoutError(f"no {kind} message {tag} {rest} within {JOB_TIMEOUT} s")
    return msg


async def _alltoall(pids: list[Any], rank: int, tag: int) -> None:
    import hpcproc as hp

    payload = b"x" * A2A_SIZE
    for r, pid in enumerate(pids):
        if r != rank:
            await hp.send(pid, ("a2a", tag, payload))
    # One matcher for the round's N - 1 messages, as one would write it (later rounds
    # of a faster rank wait in the mailbox).
    matcher = hp.match_if(lambda m: type(m) is tuple and m[0] == "a2a" and m[1] == tag)
    receive = hp.receive
    for _ in range(len(pids) - 1):
        if await receive(matcher, timeout=JOB_TIMEOUT) is None:
            raise TimeoutError(f"no a2a message {tag} within {JOB_TIMEOUT} s")


async def _scatter_gather(pids: list[Any], rank: int, tag: int, data: Any, out: Any) -> None:
    import numpy as np

    import hpcproc as hp

    n = len(pids)
    if rank == 0:
        chunks = np.array_split(data, n)
        for r in range(1, n):
            await hp.send(pids[r], ("sc", tag, chunks[r]))
        bounds = np.cumsum([0] + [len(c) for c in chunks])
        out[: bounds[1]] = chunks[0]
        for _ in range(n - 1):
            _, _, r, chunk = await _take("ga", tag)
            out[bounds[r] : bounds[r + 1]] = chunk
    else:
        _, _, chunk = await _take("sc", tag)
        await hp.send(pids[0], ("ga", tag, rank, chunk))


async def _ring_allreduce(pids: list[Any], rank: int, tag: int, x: Any) -> None:
    """In place: ``x`` becomes the sum of every rank's ``x``."""
    import numpy as np

    import hpcproc as hp

    n = len(pids)
    chunks = np.array_split(x, n)
    right = pids[(rank + 1) % n]
    for step in range(n - 1):  # reduce-scatter
        await hp.send(right, ("rs", tag, step, chunks[(rank - step) % n]))
        _, _, _, got = await _take("rs", tag, step)
        chunks[(rank - step - 1) % n] += got
    for step in range(n - 1):  # allgather
        await hp.send(right, ("ag", tag, step, chunks[(rank + 1 - step) % n]))
        _, _, _, got = await _take("ag", tag, step)
        chunks[(rank - step) % n][:] = got


async def _link_to_peers(pids: list[Any], rank: int) -> None:
    """Link this rank's measuring process to every other rank's.

    A rank whose peer failed, or whose link to it dropped (disconnect counts as
    failure), then fails at once with ``ProcessLinkException`` naming the peer and
    the reason, so that the job ends with it. Unlinked, the operation waited for the
    lost peer's message until ``JOB_TIMEOUT`` (seen: an shm link dropped in a ring
    allreduce). Links add nothing to a send or a receive.
    """
    import hpcproc as hp

    for r, pid in enumerate(pids):
        if r != rank:
            await hp.link(pid)


async def _timed(comm: Any, rounds: int, op: Any) -> float:
    """Seconds per operation: barrier, ``rounds`` times ``await op(i)``, barrier."""
    await _barrier(comm)
    t0 = time.perf_counter()
    for i in range(rounds):
        await op(i)
    await _barrier(comm)
    return (time.perf_counter() - t0) / rounds


async def _rank_body(rank: int, pids: list[Any], params: dict[str, Any]) -> dict[str, Any]:
    """What every rank runs (rank 0 in ``main``, the others in a spawned process)."""
    import numpy as np

    from hpcproc.mpi_init import import_mpi

    mpi = import_mpi()
    comm = mpi.COMM_WORLD
    n = len(pids)
    if comm.Get_size() != n or comm.Get_rank() != rank:
        raise RuntimeError(
            f"MPI rank {comm.Get_rank()}/{comm.Get_size()} is not hpcproc rank {rank}/{n}"
        )
    await _link_to_peers(pids, rank)
    tags = _Tags()
    runs, rounds = params["runs"], params["a2a_rounds"]
    rss_before = _rss()
    times: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        times.setdefault(key, []).append(value)

    # all-to-all
    send = np.zeros(n * A2A_SIZE, dtype=np.uint8)
    recv = np.empty_like(send)

    async def mpi_a2a(_: int) -> None:
        comm.Alltoall(send, recv)

    # Warm-up, untimed, for both: the first rounds open the connections (lazily, on
    # first use), and the first timed run was often the slowest (seen: 288-289 us
    # per round against 225-264 for the next ones).
    warm = max(1, rounds // 10)
    first = tags.take(warm)

    async def warm_a2a(i: int, first: int = first) -> None:
        await _alltoall(pids, rank, first + i)

    await _timed(comm, warm, warm_a2a)
    rss_after = _rss()  # every peer connected now
    await _timed(comm, warm, mpi_a2a)
    for _ in range(runs):
        first = tags.take(rounds)

        async def ours_a2a(i: int, first: int = first) -> None:
            await _alltoall(pids, rank, first + i)

        add("a2a", await _timed(comm, rounds, ours_a2a))
        add("a2a_mpi", await _timed(comm, rounds, mpi_a2a))

    # scatter/gather
    count = params["scatter_bytes"] // 8 // n * n  # equal chunks, as Scatter needs
    data: Any = np.arange(count, dtype=np.float64) if rank == 0 else None
    out: Any = np.empty(count, dtype=np.float64) if rank == 0 else None
    part = np.empty(count // n, dtype=np.float64)

    async def mpi_sg(_: int) -> None:
        comm.Scatter(data, part, root=0)
        comm.Gather(part, out, root=0)

    coll_rounds = params["coll_rounds"]
    # One untimed operation of each first, as for the all-to-all (buffers, pools);
    # between barriers, as timed ones are (they keep the loop running meanwhile).
    first = tags.take()

    async def warm_sg(_: int, first: int = first) -> None:
        await _scatter_gather(pids, rank, first, data, out)

    await _timed(comm, 1, warm_sg)
    await _timed(comm, 1, mpi_sg)
    for _ in range(runs):
        first = tags.take(coll_rounds)

        async def ours_sg(i: int, first: int = first) -> None:
            await _scatter_gather(pids, rank, first + i, data, out)

        if rank == 0:
            assert out is not None
            out.fill(-1.0)
        add("sg", await _timed(comm, coll_rounds, ours_sg))
        if rank == 0 and not np.array_equal(out, data):
            raise RuntimeError("scatter/gather with processes returned other data")
        add("sg_mpi", await _timed(comm, coll_rounds, mpi_sg))

    # ring allreduce
    m = params["allreduce_bytes"] // 8
    x = np.empty(m, dtype=np.float64)
    y = np.empty(m, dtype=np.float64)
    total = n * (n + 1) / 2

    async def mpi_ar(_: int) -> None:
        x.fill(rank + 1.0)
        comm.Allreduce(x, y, op=mpi.SUM)

    first = tags.take()

    async def warm_ar(_: int, first: int = first) -> None:
        x.fill(rank + 1.0)
        await _ring_allreduce(pids, rank, first, x)

    await _timed(comm, 1, warm_ar)
    await _timed(comm, 1, mpi_ar)
    for _ in range(runs):
        first = tags.take(coll_rounds)

        async def ours_ar(i: int, first: int = first) -> None:
            x.fill(rank + 1.0)
            await _ring_allreduce(pids, rank, first + i, x)

        add("ar", await _timed(comm, coll_rounds, ours_ar))
        if not np.all(x == total):
            raise RuntimeError("the ring allreduce with processes computed a wrong sum")
        add("ar_mpi", await _timed(comm, coll_rounds, mpi_ar))
        if not np.all(y == total):
            raise RuntimeError("MPI Allreduce computed a wrong sum")
    await _barrier(comm)
    return {"rank": rank, "times": times, "rss_before": rss_before, "rss_after": rss_after}


async def _worker(rank: int, master: Any, params: dict[str, Any]) -> None:
    """A measuring process on rank ``rank``: gets every rank's pid, runs the body,
    sends its result to rank 0, then idles until told to end (so that it does not
    disturb rank 0's round trips)."""
    import hpcproc as hp

    await hp.send(master, ("pid", rank, hp.self_pid()))
    pids = (await _take("pids", 0))[2]
    result = await _rank_body(rank, pids, params)
    await hp.send(master, ("result", rank, result))
    await _take("end", 0)


async def _rtt(peer: Any, step: Step, turn: Turn = _no_turn) -> list[float]:
    """Round trips to an echo process on ``peer`` (as ``bench.process`` measures),
    each run inside ``turn()``."""
    import hpcproc as hp

    from .process import _echo, _rtts

    echo = await hp.spawn(peer, _echo)
    # Warm up for at least RTT_SETTLE as well: the collectives just before left 4
    # ranks busy on this machine's CPUs, and the poller, having seen that, keeps
    # polling off for a while (CROWD_HOLD); round trips timed then measure that hold,
    # not routing (seen: 20-27 us in 3 of 14 runs, never with crowding ignored).
    rtts = await _rtts(echo, (hp.self_pid(), b"x" * RTT_SIZE), step, RTT_SETTLE, turn)
    await hp.send(echo, "stop")
    return rtts


async def job_main(cluster: Any) -> int:
    """Rank 0's ``main`` of the collectives job; prints one ``BENCH-CLUSTER`` line."""
    import hpcproc as hp

    params = json.loads(os.environ[PARAMS_ENV])
    me = hp.self_pid()
    n = cluster.size
    for rank in range(1, n):
        await hp.spawn(cluster.nodes[rank], _worker, rank, me, params)
    pids: list[Any] = [me] + [None] * (n - 1)
    for _ in range(n - 1):
        _, rank, pid = await _take_any("pid")
        pids[rank] = pid
    for rank in range(1, n):
        await hp.send(pids[rank], ("pids", 0, pids))
    mine = await _rank_body(0, pids, params)
    results = [mine]
    for _ in range(n - 1):
        results.append((await _take_any("result"))[2])
    endpoint = cluster.node.endpoint
    vias = {r: endpoint.transport_for(cluster.nodes[r].address) for r in range(1, n)}
    same_host = next((r for r, via in vias.items() if via == "shm"), None)
    rtt: list[float] = []
    rtt_base: list[float] = []
    try:
        if same_host is not None:
            rtt, rtt_base = await _paired_rtts(cluster.nodes[same_host], params)
    finally:
        # Even when the baseline failed: the workers wait for this to end.
        for rank in range(1, n):
            await hp.send(pids[rank], ("end", 0))
    out = {
        "size": n,
        "hosts": len(set(cluster.hosts)),
        "times": mine["times"],
        "rss_before": max(r["rss_before"] for r in results),
        "rss_after": max(r["rss_after"] for r in results),
        "rtt": rtt,
        "rtt_base": rtt_base,
        "rtt_peer": same_host,
        "vias": sorted(set(vias.values())),
    }
    sys.stdout.write(RESULT + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


async def _paired_rtts(peer: Any, params: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Round trips to ``peer`` and the process suite's shm round trips, taking turns
    run by run: (ours, baseline), one figure per run each.

    The baseline pair (two new OS processes on this host) and this rank pass a turn
    through FIFOs (:class:`bench._pair.Baton`), the pair first (its start-up is then
    not in our runs); while one side measures, the other blocks on its FIFO. Run by
    run, because this VM has phases of seconds in which either side's round trip
    swings between 7 and 19 us, not in step with the other side's (seen in blocks of
    5 runs a side: ratios of the medians 0.86-1.41 from job to job).

    Raises:
        PairError: the pair failed, or a turn did not come within PAIR_TIMEOUT.
    """
    from ._pair import Baton

    step = Step(**params["rtt_step"])
    with tempfile.TemporaryDirectory(prefix="hpcproc-bench-turns-") as tmp:
        directory = Path(tmp)
        for index in range(2):
            os.mkfifo(directory / f"baton-{index}")
        baton = Baton(directory, 0, 2, timeout=PAIR_TIMEOUT)

        def pair_rtts() -> list[float]:
            try:
                return _shm_pair_rtts(params, f"{directory}:1:2")
            except BaseException:
                baton.interrupt()  # our wait for a turn raises now, not in 120 s
                raise

        # run_in_executor submits at once: our turns block this loop.
        pair = asyncio.get_running_loop().run_in_executor(None, pair_rtts)
        try:
            baton.give()
            ours = await _rtt(peer, step, baton.turn)
            base = await pair
        except BaseException:
            # The pair's own error, if it failed (its thread then ends at once), is
            # raised here rather than the interrupted turn's. Otherwise its run_pair
            # still ends at PAIR_TIMEOUT at worst, and this rank's exit waits for that.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(pair), 5.0)
            raise
        finally:
            baton.close()
    return ours, base


def _shm_pair_rtts(params: dict[str, Any], baton: str) -> list[float]:
    """The process suite's round trip over shm (``bench.process``'s pair of nodes, two
    new OS processes on this host), as its own ``rtt`` row measures it; its runs take
    turns through ``baton`` (``BENCH_BATON``: "directory:index:count")."""
    from ._pair import run_pair

    pair = {
        "transport": "shm",
        "rtt_step": params["rtt_step"],
        "rate_count": 1,
        "rate_runs": 0,
        "spawn_count": 0,
        # The same settling as the routed round trips (_rtt): a fresh pair's first
        # milliseconds (placement on the CPUs, the poller's first readings) are not
        # the steady state either (seen: 12.1 against 7.3-8.3 us in other blocks).
        "rtt_settle_s": RTT_SETTLE,
    }
    result: list[float] = run_pair(
        "bench.process:pair_role",
        pair,
        env={
            **_outside_the_job_env(),
            "BENCH_BATON": baton,
            "BENCH_BATON_TIMEOUT": str(PAIR_TIMEOUT),
        },
        inherit_env=False,
        timeout=PAIR_TIMEOUT,
    )[0]["rtt"]
    return result


#: Prefixes of the variables of launchers (and of hpcproc.run's rank) that the pair
#: started inside a rank must not see; see _outside_the_job_env.
_LAUNCHER_PREFIXES = (
    "SLURM_",
    "SLURMD_",
    "PMI_",
    "PMIX_",
    "OMPI_",
    "MPI_LOCAL",
    "HYDRA_",
    "MV2_",
    "PALS_",
    "FLUX_",
    "LSB_",
    "JSM_",
    "PBS_",
    "TORCHELASTIC_",
    "HPCPROC_RANK",
    "HPCPROC_SIZE",
    "HPCPROC_LOCAL_",
    "HPCPROC_NODE_",
    "HPCPROC_HOSTS",
    "HPCPROC_JOB_ID",
    "HPCPROC_LIFELINE_",
    "HPCPROC_SSH",
    PARAMS_ENV,
)


def _outside_the_job_env() -> dict[str, str]:
    """This rank's environment without its launcher's variables: what the pair of the
    process suite gets when started by rank 0 (a pair that thought itself part of a
    job of 4 ranks on 2 CPUs would poll as on crowded CPUs, and measure that).

    Raises:
        RuntimeError: a launcher is still detected in it (a variable this list misses).
    """
    from hpcproc.launchers import detect

    env = {
        k: v
        for k, v in _env({}).items()
        if k == "SLURM_CONF" or not k.startswith(_LAUNCHER_PREFIXES)
    }
    found = detect(env).launcher
    if found != "local":
        raise RuntimeError(f"the baseline pair's environment still names a {found} job")
    return env


async def _take_any(kind: str) -> tuple[Any, ...]:
    """The next ``(kind, ...)`` message."""
    import hpcproc as hp

    msg: tuple[Any, ...] = await hp.receive(
        hp.match_if(lambda m: type(m) is tuple and m[0] == kind), timeout=JOB_TIMEOUT
    )
    if msg is None:
        raise TimeoutError(f"no {kind} message within {JOB_TIMEOUT} s")
    return msg


async def startup_main(cluster: Any) -> int:
    """``--spmd`` entry of the start-up runs: print when this rank entered ``main``;
    then, when asked, connect to every other rank (one ``get_node_stats`` request each:
    connections open on first use) and print the RSS before and after."""
    import hpcproc as hp

    sys.stdout.write(f"{STARTUP}{cluster.rank} {time.time()!r}\n")
    sys.stdout.flush()
    if os.environ.get(CONNECT_ENV) == "1":
        before = _rss()
        for node in cluster.nodes:
            if node != cluster.node.node_id:
                try:
                    await asyncio.wait_for(hp.get_node_stats(node), STATS_TIMEOUT)
                except asyncio.TimeoutError:
                    # A hang shows here, named, not as the job's timeout.
                    raise TimeoutError(
                        f"rank {cluster.rank}: no stats from node {node} in {STATS_TIMEOUT} s"
                    ) from None
        stats = await hp.get_node_stats(cluster.node.node_id)
        sys.stdout.write(f"{MEMORY}{cluster.rank} {before} {_rss()} {len(stats.peer_transports)}\n")
        sys.stdout.flush()
    return 0


# ---------------------------------------------------------------------- the driver


def _slurm_hosts() -> list[str]:
    """Usable nodes of the default Slurm partition (empty when none answers)."""
    if shutil.which("srun") is None or shutil.which("sinfo") is None:
        return []
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t %P"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    hosts = []
    for line in out.stdout.splitlines():
        parts = line.split()
        if (
            len(parts) == 3
            and parts[2].endswith("*")
            and parts[1].rstrip("*") in ("idle", "mix", "alloc", "plnd")
        ):
            hosts.append(parts[0])
    return sorted(set(hosts)) if out.returncode == 0 else []


#: UCX variables a user sets to choose devices and transports (importing ucxx sets
#: none of these), kept in the jobs' environment; see the module docstring.
_UCX_KEPT = ("UCX_NET_DEVICES", "UCX_TLS")


def _env(extra: dict[str, str]) -> dict[str, str]:
    # A clean environment for a new job (no step variables of an enclosing one, no
    # UCX_* set by an earlier import of ucxx), but the cluster's config and the UCX
    # device choice.
    env = {
        k: v
        for k, v in os.environ.items()
        if k in ("SLURM_CONF", *_UCX_KEPT) or not k.startswith(("SLURM_", "PMI_", "UCX_"))
    }
    env.setdefault("HPCPROC_COOKIE", secrets.token_hex(16))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def _launcher(n: int, hosts: int | None, *, mpi: bool) -> list[str]:
    """The command prefix that starts ``n`` ranks (on ``hosts`` Slurm nodes, or here)."""
    if hosts is None:
        from ._pair import find_mpiexec

        if mpi:
            return [find_mpiexec(), "-n", str(n)]
        return []
    options = ["--mpi=pmi2"] if mpi else []
    # --overcommit: more ranks than the hosts have CPUs (64 on 3 hosts of 2);
    # --oversubscribe: beside other jobs on a shared test cluster.
    return ["srun", *options, "--overcommit", "--oversubscribe", "-N", str(hosts), "-n", str(n)]


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


def _run(argv: list[str], env: dict[str, str], what: str) -> str:
    try:
        proc = subprocess.run(
            argv,
            env=env,
            capture_output=True,
            text=True,
            timeout=JOB_TIMEOUT,
            check=False,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as exc:
        # With what it wrote: a hung job's ranks may have logged why (a link dropped).
        out, err = (_text(b) for b in (exc.stdout, exc.stderr))
        raise RuntimeError(
            f"{what} did not finish within {JOB_TIMEOUT} s: {' '.join(argv)}\n"
            f"{out[-4000:]}\n{err[-4000:]}"
        ) from exc
    if proc.returncode != 0:
        if "mpi/pmi2: invalid client request" in proc.stderr + proc.stdout:
            what += (
                " (MPI_Init failed on a cut PMI request: set UCX_NET_DEVICES, see bench.cluster)"
            )
        raise RuntimeError(
            f"{what} failed (status {proc.returncode}): {' '.join(argv)}\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc.stdout


def _collectives(
    options: SuiteOptions, n: int, hosts: int | None, params: dict[str, Any]
) -> dict[str, Any]:
    argv = [
        *_launcher(n, hosts, mpi=True),
        sys.executable, "-m", "hpcproc.run", "--rendezvous", "mpi",
        "--transport", options.transport, "bench.cluster:job_main",
    ]  # fmt: skip
    out = _run(argv, _env({PARAMS_ENV: json.dumps(params)}), "the collectives job")
    for line in out.splitlines():
        if line.startswith(RESULT):
            result: dict[str, Any] = json.loads(line[len(RESULT) :])
            return result
    raise RuntimeError(f"the collectives job printed no result:\n{out[-4000:]}")


def _startup(
    options: SuiteOptions, n: int, hosts: int | None, *, bare: bool
) -> tuple[float, tuple[int, int] | None]:
    """Seconds from starting the launcher to the last rank's ``main`` (or, ``bare``,
    to the last bare interpreter's first line); and, not ``bare``, the largest RSS of
    a rank before and after connecting to all the others."""
    if bare:
        code = f"import sys, time; sys.stdout.write('{STARTUP}0 %r\\n' % time.time())"
        command = [sys.executable, "-c", code]
    else:
        command = [
            sys.executable, "-m", "hpcproc.run", "--spmd",
            "--transport", options.transport, "bench.cluster:startup_main",
        ]  # fmt: skip
    if hosts is None and not bare:
        command = [*command[:3], "--np", str(n), *command[3:]]
    env = _env({CONNECT_ENV: "1"})
    launched = time.time()
    if hosts is None and bare:
        procs = [
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(n)
        ]
        out = "".join(p.communicate(timeout=JOB_TIMEOUT)[0] for p in procs)
    else:
        out = _run([*_launcher(n, hosts, mpi=False), *command], env, f"start-up of {n} ranks")
    stamps = [float(m[1]) for m in re.finditer(rf"^{STARTUP}\d+ (\S+)$", out, re.M)]
    if len(stamps) != n:
        raise RuntimeError(f"{len(stamps)} of {n} ranks reported their start:\n{out[-4000:]}")
    if bare:
        return max(stamps) - launched, None
    memory = [
        (int(m[1]), int(m[2]), int(m[3]))
        for m in re.finditer(rf"^{MEMORY}\d+ (\d+) (\d+) (\d+)$", out, re.M)
    ]
    if len(memory) != n or any(peers != n - 1 for _, _, peers in memory):
        raise RuntimeError(f"not every rank connected to every other:\n{out[-4000:]}")
    rss = (max(b for b, _, _ in memory), max(a for _, a, _ in memory))
    return max(stamps) - launched, rss


def run(options: SuiteOptions) -> list[Record]:
    """Run the suite (see the module docstring).

    Raises:
        RuntimeError: a job failed or reported a wrong result.
        ValueError: no Slurm cluster and no mpiexec for a local run.
    """
    smoke, quick = options.smoke, options.quick or options.smoke
    slurm = [] if options.np is not None else _slurm_hosts()
    most = int(os.environ.get("HPCPROC_CLUSTER_HOSTS", "0")) or len(slurm)
    usable = min(len(slurm), most)
    where = "srun" if usable >= 2 else "local"
    n = options.np or 4
    job_hosts = min(2, usable) if where == "srun" else None
    rtt_step = Step(RTT_SIZE, 20, 1, 5) if smoke else Step(RTT_SIZE, 300, 20, 100)
    params: dict[str, Any] = {
        # 9 runs (--quick too): one run's all-to-all ratio ranges 1.6-3.6 on this VM,
        # and the median of 5 a side moved with a single slow run.
        "runs": 1 if smoke else 9,
        "a2a_rounds": 3 if smoke else (1000 if quick else 2000),
        "coll_rounds": 1 if smoke else (3 if quick else 5),
        "scatter_bytes": (1 << 20) if smoke else SCATTER_BYTES,
        "allreduce_bytes": (64 << 10) if smoke else ALLREDUCE_BYTES,
        "rtt_step": asdict(rtt_step),
    }
    transport = options.transport
    label = f"{transport} ({where}, {n} ranks" + (f", {job_hosts} hosts)" if job_hosts else ")")
    result = _collectives(options, n, job_hosts, params)
    times = {k: median(v) * 1e6 for k, v in result["times"].items()}
    records = [
        record(
            SUITE, label, "op_time", A2A_SIZE, times["a2a"], "mpi4py Alltoall", times["a2a_mpi"]
        ),
        record(
            SUITE,
            label,
            "op_time",
            params["scatter_bytes"],
            times["sg"],
            "mpi4py Scatter+Gather",
            times["sg_mpi"],
        ),
        record(
            SUITE,
            label,
            "op_time",
            params["allreduce_bytes"],
            times["ar"],
            "mpi4py Allreduce",
            times["ar_mpi"],
        ),
        record(
            SUITE,
            label,
            "node_rss",
            0,
            float(result["rss_after"]),
            "1 peer connected",
            float(result["rss_before"]),
        ),
    ]
    if result["rtt"]:
        records.append(
            record(
                SUITE,
                f"{label}: same-host peer",
                "rtt",
                RTT_SIZE,
                median(result["rtt"]) * 1e6,
                "process suite, shm",
                median(result["rtt_base"]) * 1e6,
            )
        )
    for size in (4,) if smoke else (4, 16, 64):
        hosts = None if where == "local" else min(usable, max(2, size // 2))
        ours, rss = _startup(options, size, hosts, bare=False)
        bare, _ = _startup(options, size, hosts, bare=True)
        assert rss is not None
        where_n = f"{transport} ({where}, {size} ranks" + (f", {hosts} hosts)" if hosts else ")")
        records.append(record(SUITE, where_n, "startup", 0, ours, "bare python", bare))
        if size == 64:
            records.append(record(SUITE, where_n, "startup", 0, ours, "target", TARGET_STARTUP_64))
        records.append(
            record(SUITE, where_n, "node_rss", 0, float(rss[1]), "0 peers connected", float(rss[0]))
        )
    return records
