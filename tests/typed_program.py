"""A small user program written against the typed API; mypy --strict checks it (CI).

Each ``assert_type`` is a static promise (a no-op at run time); each
``# type: ignore[...]`` marks a mistake the checker must catch (this module is
checked with ``warn_unused_ignores``, so a check that stopped firing fails mypy).
:func:`run` runs it over an in-memory node (``tests/test_process_types.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from typing_extensions import assert_type

import hpcproc as hp


@dataclass(frozen=True)
class Job:
    reply: hp.SendPort[float]
    x: float


async def square(x: float) -> float:
    return x * x


async def worker() -> None:
    job = await hp.expect(Job)
    assert_type(job, Job)
    await hp.send_chan(job.reply, job.x * 2)


async def master(cluster_node: hp.NodeId) -> tuple[float, float, float | None]:
    squared = await hp.call(cluster_node, square, 3.0)
    assert_type(squared, float)

    send_port, receive_port = hp.new_chan(float)
    assert_type(send_port, hp.SendPort[float])
    pid = await hp.spawn(cluster_node, worker)
    await hp.send(pid, Job(send_port, 2.0))
    doubled = await hp.receive_chan(receive_port)
    assert_type(doubled, float)

    maybe = await hp.expect(float, timeout=0)
    assert_type(maybe, float | None)
    nothing = await hp.receive_chan(receive_port, timeout=0)
    assert_type(nothing, float | None)
    return squared, doubled, maybe


async def mistakes(node: hp.NodeId, port: hp.SendPort[float]) -> None:
    """Never run: mistakes the type checker catches."""
    await hp.send_chan(port, "not a float")  # type: ignore[misc]
    _ = await hp.call(node, square, 1.0) + "x"  # type: ignore[operator]
    _ = (await hp.expect(int)).upper()  # type: ignore[attr-defined]


def run() -> tuple[float, float, float | None]:
    """Run :func:`master` on an in-memory node; its result."""
    import asyncio

    async def main() -> tuple[float, float, float | None]:
        transport = hp.transports.create("inmemory")
        async with hp.Node(transport) as node:
            result: tuple[float, float, float | None] = await node.run(master, node.node_id)
        await transport.close()
        return result

    return asyncio.run(main())


async def entry(cluster: hp.Cluster) -> int:
    """A ``python -m hpcproc.run`` entry point, typed through ``hp.Cluster``."""
    assert_type(cluster.peers, tuple[hp.NodeId, ...])
    for nid in cluster.peers:
        await hp.call(nid, square, float(cluster.rank))
    return 0
