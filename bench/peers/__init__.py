"""The ``peers`` suite: hpcproc's process layer beside other runtimes, in the same run.

Peers (each skipped with a line saying how to install it when its runtime is missing;
see :func:`unavailable`):

* ``erlang``: Erlang/OTP distribution between two nodes on this machine
  (:mod:`bench.peers.erlang`);
* ``ray``: Ray actors and tasks on a local instance (:mod:`bench.peers.ray_actors`);
* ``dask``: a Dask distributed actor and tasks (:mod:`bench.peers.dask_actors`);
* ``ProcessPoolExecutor`` with one worker (:mod:`bench.peers.pool`);
* ``mp.Pipe``: ``multiprocessing.Pipe`` ``send``/``recv`` of objects
  (:mod:`bench.peers.pipe`).

Each peer figure is compared with the hpcproc figure of the closest setup, measured in
the same run by :func:`bench.process.pair_role` (two nodes in two OS processes, over
every transport named by ``--transport``, a comma-separated list) and
:func:`bench.process.local_role` (two processes of one node, transport ``local``):

* process round trip, ``rtt`` 8 B: erlang, mp.Pipe, ray sync and async actors, dask
  actor;
* 16 MiB numpy round trip, ``bandwidth``: erlang (a binary), mp.Pipe, ray actor;
* one-way messages, ``msg_rate`` 8 B: erlang one-way;
* pipelined round trips (N requests, then N replies), ``msg_rate`` 8 B: ray pipelined
  actor calls;
* sequential remote spawn, ``spawn_rate``: erlang ``spawn_request``;
* ``hp.call`` from 50 concurrent processes, ``task_rate``: ray task,
  ProcessPoolExecutor, dask task;
* one node (transport ``local``): round trip, one-way message rate, spawn rate: erlang
  on one node.

Rounds (1 with ``--quick`` or ``--smoke``, else 3) run every implementation once each,
one after the other; the median over all runs is reported.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from .._pair import run_pair
from .._records import Record, median, record
from .._suites import SuiteOptions
from .._timing import Step
from ..transport import BASELINES, _launch_for
from . import erlang

__all__ = ["PEERS", "run", "unavailable"]

SUITE = "peers"
SMALL = 8
BIG = 16 << 20

#: peer -> (its check: None when it can run, else why not and how to install it).
PEERS: dict[str, Callable[[], str | None]] = {
    "erlang": erlang.available,
    "ray": lambda: _module("ray", "pip install -e '.[bench]' (or pip install ray)"),
    "dask": lambda: _module(
        "distributed", "pip install -e '.[bench]' (or pip install 'dask[distributed]')"
    ),
    "ProcessPoolExecutor": lambda: None,
    "mp.Pipe": lambda: None,
}


def _module(name: str, hint: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return f"{name} not installed: {hint}"
    return None


def unavailable() -> dict[str, str]:
    """Peers that cannot run here -> why, and how to install them."""
    out = {}
    for peer, check in PEERS.items():
        why = check()
        if why is not None:
            out[peer] = why
    return out


def _params(options: SuiteOptions) -> dict[str, Any]:
    if options.smoke:
        step = Step(SMALL, 20, 1, 5)
        counts = dict(big_iters=2, rate=200, rate_runs=1, spawn=20, local_spawn=2000, calls=40)
        counts.update(pipeline=100, local=2000)
    elif options.quick:
        step = Step(SMALL, 300, 5, 100)
        counts = dict(big_iters=5, rate=5000, rate_runs=3, spawn=300, local_spawn=20_000)
        counts.update(calls=500, pipeline=2000, local=100_000)
    else:
        step = Step(SMALL, 1000, 9, 100)
        counts = dict(big_iters=10, rate=20000, rate_runs=5, spawn=1000, local_spawn=20_000)
        counts.update(calls=2000, pipeline=5000, local=300_000)
    return {
        "rtt_step": asdict(step),
        "local_rtt_step": asdict(step),
        "steps": [asdict(step)],
        "rate_count": counts["rate"],
        "rate_runs": counts["rate_runs"],
        "spawn_count": counts["spawn"],
        "local_count": counts["local"],
        "spawn_count_local": counts["local_spawn"],
        "peer_extras": {
            "runs": counts["rate_runs"],
            "big_size": BIG,
            "big_iters": counts["big_iters"],
            "pipeline_count": counts["pipeline"],
            "call_count": counts["calls"],
            "callers": 50,
        },
        # For the peers' own roles: the same counts under flat names.
        "iters": step.iters,
        "runs": step.runs,
        "warmup": step.warmup,
        "big_size": BIG,
        "big_iters": counts["big_iters"],
        "pipeline_count": counts["pipeline"],
        "call_count": counts["calls"],
    }


def _transports(spec: str) -> list[str]:
    names = [name.strip() for name in spec.split(",") if name.strip()]
    bad = [name for name in names if name not in BASELINES]
    if bad or not names:
        raise ValueError(
            f"peers: --transport takes a comma-separated list of {', '.join(BASELINES)}; "
            f"got {spec!r}"
        )
    return names


def _bw(seconds: list[float]) -> float:
    return 2 * BIG / median(seconds) / 1e9


def run(options: SuiteOptions) -> list[Record]:
    """Measure hpcproc and every available peer; see the module docstring.

    Peers that cannot run here are left out, with a line on stderr saying why.

    Raises:
        ValueError: ``options.transport`` names no transport of the transport suite.
        PairError, ErlangError: a measuring process failed.
    """
    transports = _transports(options.transport)
    skipped = unavailable()
    for peer, why in skipped.items():
        print(f"peers: skipping {peer}: {why}", file=sys.stderr)
    params = _params(options)
    rounds = 1 if options.quick or options.smoke else 3
    env = {"HPCPROC_COOKIE": os.environ.get("HPCPROC_COOKIE") or secrets.token_hex(16)}
    ours: dict[str, dict[str, list[float]]] = {t: {} for t in transports}
    local: dict[str, list[float]] = {}
    theirs: dict[str, dict[str, list[float]]] = {}

    def add(into: dict[str, list[float]], values: dict[str, list[float]]) -> None:
        for key, runs in values.items():
            into.setdefault(key, []).extend(runs)

    solo_peers = {
        "mp.Pipe": "bench.peers.pipe:role",
        "ProcessPoolExecutor": "bench.peers.pool:role",
        "ray": "bench.peers.ray_actors:role",
        "dask": "bench.peers.dask_actors:role",
    }
    for _ in range(rounds):
        if "erlang" not in skipped:
            add(
                theirs.setdefault("erlang", {}),
                erlang.measure(
                    [
                        params["iters"],
                        params["runs"],
                        params["warmup"],
                        BIG,
                        params["big_iters"],
                        params["rate_count"],
                        params["rate_runs"],
                        params["spawn_count"],
                        params["spawn_count_local"],
                    ]
                ),
            )
        for name in transports:
            pair = run_pair(
                "bench.process:pair_role",
                {**params, "transport": name},
                launch=_launch_for(name),
                env=env,
            )[0]
            add(ours[name], pair)
        add(local, run_pair("bench.process:local_role", params, launch="solo", env=env)[0])
        for peer, target in solo_peers.items():
            if peer not in skipped:
                add(theirs.setdefault(peer, {}), run_pair(target, params, launch="solo")[0])
    return _records(transports, ours, local, theirs)


def _records(
    transports: list[str],
    ours: dict[str, dict[str, list[float]]],
    local: dict[str, list[float]],
    theirs: dict[str, dict[str, list[float]]],
) -> list[Record]:
    out: list[Record] = []
    erl = theirs.get("erlang")
    pipe = theirs.get("mp.Pipe")
    ray = theirs.get("ray")
    dask = theirs.get("dask")
    pool = theirs.get("ProcessPoolExecutor")
    for name in transports:
        m = ours[name]
        rtt = median(m["rtt"]) * 1e6

        def rtt_row(
            baseline: str, seconds: list[float], name: str = name, rtt: float = rtt
        ) -> Record:
            return record(SUITE, name, "rtt", SMALL, rtt, baseline, median(seconds) * 1e6)

        def bw_row(baseline: str, seconds: list[float], name: str = name) -> Record:
            return record(
                SUITE, name, "bandwidth", BIG, _bw(ours[name]["big_rtt"]), baseline, _bw(seconds)
            )

        def rate_row(
            metric: str, ours_key: str, baseline: str, rates: list[float], name: str = name
        ) -> Record:
            size = SMALL if metric == "msg_rate" else 0
            value = median(ours[name][ours_key])
            return record(SUITE, name, metric, size, value, baseline, median(rates))

        if erl is not None:
            out.append(rtt_row("erlang", erl["rtt_remote"]))
            out.append(bw_row("erlang", erl["rtt_remote_big"]))
            out.append(rate_row("msg_rate", "rate", "erlang one-way", erl["rate_remote"]))
            out.append(rate_row("spawn_rate", "spawn", "erlang spawn_request", erl["spawn_remote"]))
        if pipe is not None:
            out.append(rtt_row("mp.Pipe", pipe["rtt"]))
            out.append(bw_row("mp.Pipe", pipe["big_rtt"]))
        if ray is not None:
            out.append(rtt_row("ray sync actor", ray["rtt_sync"]))
            out.append(rtt_row("ray async actor", ray["rtt_async"]))
            out.append(bw_row("ray actor", ray["big_rtt"]))
            out.append(rate_row("msg_rate", "pipelined", "ray pipelined calls", ray["pipelined"]))
            out.append(rate_row("task_rate", "calls", "ray task", ray["tasks"]))
        if dask is not None:
            out.append(rtt_row("dask actor", dask["rtt"]))
            out.append(rate_row("task_rate", "calls", "dask task", dask["tasks"]))
        if pool is not None:
            out.append(rate_row("task_rate", "calls", "ProcessPoolExecutor", pool["tasks"]))
    if erl is not None:
        out.append(
            record(
                SUITE,
                "local",
                "rtt",
                SMALL,
                median(local["rtt"]) * 1e6,
                "erlang",
                median(erl["rtt_local"]) * 1e6,
            )
        )
        out.append(
            record(
                SUITE,
                "local",
                "msg_rate",
                0,
                median(local["rate"]),
                "erlang",
                median(erl["rate_local"]),
            )
        )
        out.append(
            record(
                SUITE,
                "local",
                "spawn_rate",
                0,
                median(local["spawn"]),
                "erlang",
                median(erl["spawn_local"]),
            )
        )
    return out
