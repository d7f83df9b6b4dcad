"""Nodes that join a running cluster and leave it (issue 16, part 1), with real OS
processes on this machine: ``python -m hpcproc.run --np 2`` as the running job and
``python -m hpcproc.join`` as the newcomers; membership seen through
``hp.monitor_nodes()`` / ``hp.nodes()``. The same across hosts under Slurm is in
``tests/test_elastic_cluster.py``."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import hpcproc as hp
from tests._lines import LineProcess

ROOT = Path(__file__).resolve().parent.parent
THIS = f"{Path(__file__).resolve()}"
WAIT = 60.0


def say_line(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------ apps run by the tests


async def where() -> str:
    return socket.gethostname()


async def sleep_forever() -> None:
    await hp.expect(str)


async def watch_members(master: hp.Pid) -> None:
    """On a launcher-started worker: subscribe, say so, pass on what it sees."""
    hp.monitor_nodes()
    await hp.send(master, "subscribed")
    while True:
        msg = await hp.expect((hp.NodeUp, hp.NodeDown))
        await hp.send(master, ("worker saw", type(msg).__name__, msg.node, len(hp.nodes())))


async def app_elastic(cluster: Any) -> int:
    """Accept two joiners: check the first one (call, spawn, graceful leave), keep the
    second until the end; exit with 3 (which the second one must exit with too)."""
    hp.monitor_nodes()
    worker = cluster.peers[0]
    await hp.spawn(worker, watch_members, hp.self_pid())
    assert await hp.expect(str, timeout=WAIT) == "subscribed"
    say_line(f"members at start={len(hp.nodes())}")
    say_line(f"address={cluster.node.node_id}")
    up = await hp.expect(hp.NodeUp, timeout=WAIT)
    assert up is not None, "no NodeUp"
    assert up.node in hp.nodes()
    seen = await hp.expect(tuple, timeout=WAIT)
    assert seen is not None and seen[:3] == ("worker saw", "NodeUp", up.node), seen
    say_line(f"joined node on {await hp.call(up.node, where)}; members={len(hp.nodes())}")
    say_line(f"worker sees members={seen[3]}")
    _, _ref = await hp.spawn_monitor(up.node, sleep_forever)
    say_line("ready-for-leave")
    down = await hp.expect(hp.NodeDown, timeout=WAIT)
    assert down is not None and down.node == up.node
    mon = await hp.expect(hp.ProcessMonitorNotification, timeout=WAIT)
    assert mon is not None
    seen = await hp.expect(tuple, timeout=WAIT)
    assert seen is not None and seen[:3] == ("worker saw", "NodeDown", up.node), seen
    say_line(
        f"left: {type(down.reason).__name__} monitor: {type(mon.reason).__name__};"
        f" members={len(hp.nodes())} worker sees members={seen[3]}"
    )
    up2 = await hp.expect(hp.NodeUp, timeout=WAIT)
    assert up2 is not None
    say_line(f"second joined on {await hp.call(up2.node, where)}")
    return 3


# ------------------------------------------------------------ helpers


@pytest.fixture
def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HPCPROC_", "SLURM_"))}
    e["PYTHONPATH"] = str(ROOT)
    e["HPCPROC_COOKIE"] = f"test-membership-{uuid.uuid4().hex}"
    return e


@pytest.fixture
def procs() -> Iterator[list[LineProcess]]:
    started: list[LineProcess] = []
    yield started
    for p in started:
        p.kill(30)


def start(procs: list[LineProcess], argv: list[str], env: dict[str, str]) -> LineProcess:
    p = LineProcess(argv, env, ROOT)
    procs.append(p)
    return p


def joiner(procs: list[LineProcess], address: str, env: dict[str, str]) -> LineProcess:
    return start(procs, [sys.executable, "-m", "hpcproc.join", address, f"{THIS}:app_elastic"], env)


def address_of(job: LineProcess) -> str:
    line = job.wait_for_lines(r"^address=", 1, WAIT)[0]
    return line.strip().partition("=")[2]


# ------------------------------------------------------------ tests


def test_joined_node_is_announced_used_and_its_graceful_leave_is_node_down(
    procs: list[LineProcess], env: dict[str, str]
) -> None:
    job = start(
        procs, [sys.executable, "-m", "hpcproc.run", "--np", "2", f"{THIS}:app_elastic"], env
    )
    address = address_of(job)
    first = joiner(procs, address, env)
    assert "members at start=1\n" in job.output, job.output
    line = job.wait_for_lines(r"^joined node on ", 1, WAIT)[0]
    assert line.strip().endswith("members=2"), line
    assert job.wait_for_lines(r"^worker sees members=", 1, WAIT)[0].strip().endswith("=2")
    job.wait_for_lines(r"^ready-for-leave", 1, WAIT)
    first.proc.send_signal(signal.SIGTERM)
    line = job.wait_for_lines(r"^left: ", 1, WAIT)[0]
    # A graceful leave: DiedNodeDown to the node's watchers and its processes' monitors.
    assert "left: DiedNodeDown monitor: DiedNodeDown; members=1" in line, line
    assert "worker sees members=1" in line, line
    rc, out = first.finish(WAIT)
    assert rc == 128 + signal.SIGTERM, out
    second = joiner(procs, address, env)
    job.wait_for_lines(r"^second joined on ", 1, WAIT)
    rc, out = job.finish(WAIT)
    assert rc == 3, out
    # The master ends every member, joined ones included, with its status.
    rc, out2 = second.finish(WAIT)
    assert rc == 3, out2


def test_join_with_another_cookie_is_refused_and_the_job_goes_on(
    procs: list[LineProcess], env: dict[str, str]
) -> None:
    # tcp: the transport that authenticates (shm connects processes of one host only).
    job = start(
        procs,
        [
            sys.executable,
            "-m",
            "hpcproc.run",
            "--np",
            "2",
            "--transport",
            "tcp",
            f"{THIS}:app_elastic",
        ],
        env,
    )
    address = address_of(job)
    assert address.startswith("nid://tcp://"), address
    stranger = joiner(procs, address, {**env, "HPCPROC_COOKIE": "not-the-cluster-cookie"})
    rc, out = stranger.finish(WAIT)
    assert rc == 1, out
    assert re.search(r"cannot reach node .* to join through it", out), out
    # The job did not see it; a node with the cookie still joins.
    honest = joiner(procs, address, env)
    line = job.wait_for_lines(r"^joined node on ", 1, WAIT)[0]
    assert line.strip().endswith("members=2"), line
    job.wait_for_lines(r"^ready-for-leave", 1, WAIT)
    honest.proc.send_signal(signal.SIGTERM)
    job.wait_for_lines(r"^left: ", 1, WAIT)
    assert honest.finish(WAIT)[0] == 128 + signal.SIGTERM
    job.kill(30)


def test_join_to_an_address_that_is_not_a_node_address_is_a_clear_error(
    env: dict[str, str],
) -> None:
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "hpcproc.join", "127.0.0.1:9"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert out.returncode == 2, out
    assert "not a node address" in out.stderr and "nid://tcp://" in out.stderr, out.stderr


def test_nodes_joining_through_different_members_meet_each_other() -> None:
    """Four nodes in one process over tcp: B joins A, C joins A, D joins B; every node
    ends with the other three (full mesh), and a subscriber saw each as NodeUp."""
    asyncio.run(asyncio.wait_for(_four_nodes_meet(), WAIT))


async def _four_nodes_meet() -> None:
    transports = [hp.transports.create("tcp", host="127.0.0.1") for _ in range(4)]
    nodes = [hp.Node(t) for t in transports]
    try:
        for n in nodes:
            await n.start()
        a, b, c, d = nodes

        async def subscribe_then_join(contact: hp.NodeId | None, want: int) -> list[Any]:
            hp.monitor_nodes()
            if contact is not None:
                await hp.join(contact)
            ups: list[Any] = []
            while len(ups) < want:
                msg = await hp.expect(hp.NodeUp, timeout=WAIT)
                assert msg is not None, f"only {ups}"
                ups.append(msg.node)
            return sorted(ups, key=repr)

        watch_a = asyncio.ensure_future(a.run(subscribe_then_join, None, 3))
        await asyncio.sleep(0)
        got_b = await b.run(subscribe_then_join, a.node_id, 1)
        assert got_b == [a.node_id]
        watch_c = asyncio.ensure_future(c.run(subscribe_then_join, a.node_id, 3))
        watch_d = asyncio.ensure_future(d.run(subscribe_then_join, b.node_id, 3))
        others = lambda n: sorted((m.node_id for m in nodes if m is not n), key=repr)  # noqa: E731
        assert await asyncio.wait_for(watch_a, WAIT) == others(a)
        assert await asyncio.wait_for(watch_c, WAIT) == others(c)
        assert await asyncio.wait_for(watch_d, WAIT) == others(d)

        async def view() -> list[hp.NodeId]:
            return sorted(hp.nodes(), key=repr)

        for n in (a, c, d):
            assert await n.run(view) == others(n)
    finally:
        for n in nodes:
            await n.close()
        for t in transports:
            await t.close()
