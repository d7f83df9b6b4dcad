"""The ``transport`` suite: round trip and round-trip bandwidth, 8 B to 64 MiB.

Two OS processes ping-pong one single-frame message per round trip through the
chosen hpcproc transport (created with :func:`hpcproc.transports.create`; the echo
side answers on a connection it opens back to the sender). In the same run, the
baselines for that transport do the same with raw libraries (see
:mod:`bench.baselines`). Reported per size, as the median over runs:

* ``rtt``: time of one round trip (us), for sizes up to 32 KiB;
* ``bandwidth``: bytes moved per second in a round trip, ``2 * size / rtt`` (GB/s),
  for sizes from 32 KiB.

All implementations run at once and take turns run by run (:func:`bench.run_pairs`),
so that slow phases of a shared machine hit hpcproc and its baselines alike; except
where one runs under ``mpiexec`` (its waiting rank would busy-poll during the others'
turns): then they run one after the other.

``--tls`` (tcp only) adds hpcproc's tcp transport over mutual TLS (:mod:`hpcproc.tls`)
to the same run, reported as transport ``tcp+tls`` against plain hpcproc tcp as its
baseline (``hpcproc-tcp``): the cost of TLS. Its certificates come from the
``HPCPROC_TLS_*`` variables, else a throw-away CA made for the run.
"""

from __future__ import annotations

import base64
import os
import secrets
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import numpy as np

from ._pair import Job, Launch, Peer, run_pairs
from ._records import Record, median, record
from ._suites import SuiteOptions
from ._timing import Step, atime_steps, plan

__all__ = ["BASELINES", "hpcproc_role", "run"]

SUITE = "transport"
RTT_MAX = 32768
BANDWIDTH_MIN = 32768

#: transport -> [(baseline name, role function, launch mode)].
BASELINES: dict[str, list[tuple[str, str, Launch]]] = {
    "tcp": [
        ("socket", "bench.baselines.socket_tcp:role", "local"),
        ("socket-asyncio", "bench.baselines.socket_asyncio:role", "local"),
    ],
    "shm": [
        ("mp.Pipe", "bench.baselines.pipe:role", "solo"),
        ("mpi4py", "bench.baselines.mpi:buffer_role", "mpiexec"),
    ],
    "mpi": [
        ("mpi4py", "bench.baselines.mpi:buffer_role", "mpiexec"),
        ("mpi4py-pickle", "bench.baselines.mpi:pickle_role", "mpiexec"),
        ("asyncio-floor", "bench.baselines.mpi:asyncio_floor_role", "mpiexec"),
    ],
    "ucx": [("ucxx", "bench.baselines.ucxx_raw:role", "local")],
}

#: Transports whose two processes must be MPI ranks.
_UNDER_MPIEXEC = {"mpi"}
#: Extra environment per transport (for its hpcproc run and its baselines alike).
_ENV: dict[str, dict[str, str]] = {"ucx": {"UCX_TLS": "tcp,sm,self"}}


async def hpcproc_tls_role(peer: Peer) -> dict[str, list[float]] | None:
    """:func:`hpcproc_role` with ``tls=True`` (files from ``HPCPROC_TLS_*``)."""
    options = dict(peer.params.get("options", {}), tls=True)
    peer.params = {**peer.params, "options": options}
    return await hpcproc_role(peer)


async def hpcproc_role(peer: Peer) -> dict[str, list[float]] | None:
    """Ping-pong through ``hpcproc.transports.create(params["transport"])``.

    Role 1 publishes its endpoint address and echoes every message on a connection
    back to the sender; role 0 connects and times the plan.
    """
    from hpcproc.transports import (
        ConnectionClosed,
        ConnectionOpened,
        Received,
        create,
    )

    transport = create(peer.params["transport"], **peer.params.get("options", {}))
    try:
        endpoint = await transport.new_endpoint()
        if peer.role == 1:
            peer.publish("address", base64.b64encode(endpoint.address).decode())
            back = None
            while True:
                event = await endpoint.receive()
                if isinstance(event, Received):
                    assert back is not None
                    await back.send(event.frames)
                elif isinstance(event, ConnectionOpened):
                    back = await endpoint.connect(event.remote_address)
                elif isinstance(event, ConnectionClosed):
                    return None
                # Drop the message before waiting for the next, as the baselines reuse
                # one receive buffer: transports that pool receive buffers (mpi) then
                # reuse the same one too, instead of alternating between two.
                del event
        steps = [Step(**s) for s in peer.params["steps"]]
        address = base64.b64decode(await peer.alookup("address"))
        conn = await endpoint.connect(address)  # type: ignore[arg-type]
        opened = await endpoint.receive()
        assert isinstance(opened, ConnectionOpened), opened
        receive = endpoint.receive

        def prepare(size: int) -> Callable[[], Awaitable[None]]:
            frames = [memoryview(np.ones(size, dtype=np.uint8))]  # type: ignore[arg-type]
            send = conn.send

            async def one() -> None:
                await send(frames)
                await receive()

            return one

        result = await atime_steps(steps, prepare, peer.turn)
        await conn.close()
        return result
    finally:
        await transport.close()


def _launch_for(transport: str) -> Launch:
    return "mpiexec" if transport in _UNDER_MPIEXEC else "local"


def _records(
    transport: str, baseline: str, ours: dict[str, list[float]], theirs: dict[str, list[float]]
) -> list[Record]:
    out = []
    for key in ours:
        if key not in theirs:
            continue  # a baseline that measures only some sizes
        size = int(key)
        t_ours, t_base = median(ours[key]), median(theirs[key])
        if size <= RTT_MAX:
            out.append(record(SUITE, transport, "rtt", size, t_ours * 1e6, baseline, t_base * 1e6))
        if size >= BANDWIDTH_MIN:
            out.append(
                record(
                    SUITE,
                    transport,
                    "bandwidth",
                    size,
                    2 * size / t_ours / 1e9,
                    baseline,
                    2 * size / t_base / 1e9,
                )
            )
    return out


def run(options: SuiteOptions) -> list[Record]:
    """Measure ``options.transport`` and its baselines; see the module docstring.

    Raises:
        ValueError: the transport has no baseline here (e.g. ``inmemory``, which cannot
            span two processes).
        PairError: a measuring process failed.
    """
    name = options.transport
    if name not in BASELINES:
        raise ValueError(f"no transport benchmark for {name!r}; have: {', '.join(BASELINES)}")
    if options.tls and name != "tcp":
        raise ValueError(f"--tls measures the tcp transport, not {name!r}")
    if options.tls and not any(k.startswith("HPCPROC_TLS_") for k in os.environ):
        with tempfile.TemporaryDirectory(prefix="hpcproc-bench-tls-") as tmp:
            from hpcproc.tls import init_directory

            init_directory(os.path.join(tmp, "job"))
            return _run(options, {"HPCPROC_TLS_DIR": os.path.join(tmp, "job")})
    return _run(options, {})


def _run(options: SuiteOptions, extra_env: dict[str, str]) -> list[Record]:
    name = options.transport
    steps = plan(options.quick, smoke=options.smoke)
    env = {**_ENV.get(name, {}), **extra_env}
    # A private cookie, so that the benchmark never reads or creates ~/.hpcproc/cookie.
    env.setdefault("HPCPROC_COOKIE", os.environ.get("HPCPROC_COOKIE") or secrets.token_hex(16))
    params: dict[str, Any] = {
        "steps": [asdict(s) for s in steps],
        "transport": name,
        "options": dict(options.transport_options),
    }
    jobs = [Job(target, launch) for _, target, launch in BASELINES[name]]
    jobs.append(Job("bench.transport:hpcproc_role", _launch_for(name)))
    if options.tls:
        jobs.append(Job("bench.transport:hpcproc_tls_role", "local"))
    # MPI ranks busy-poll while they wait, which would load the others' turns.
    interleave = all(job.launch != "mpiexec" for job in jobs)
    runs = run_pairs(jobs, params, env=env, interleave=interleave)
    results = [per_role[0] for per_role in runs]
    tls = results.pop() if options.tls else None
    ours = results[-1]
    theirs = {baseline: results[i] for i, (baseline, _, _) in enumerate(BASELINES[name])}
    records = []
    for baseline, _, _ in BASELINES[name]:
        records.extend(_records(name, baseline, ours, theirs[baseline]))
    if tls is not None:
        records.extend(_records(f"{name}+tls", f"hpcproc-{name}", tls, ours))
    return records
