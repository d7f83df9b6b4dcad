"""``python -m hpcproc.run`` with a master that traps exits, short ids in output, and
main's exit status (issue 12, points 2 and 6), with real OS processes."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import hpcproc as hp
from tests.test_run_local import Rank, env, ranks, say_line, start

__all__ = ["env", "ranks"]

THIS = f"{Path(__file__).resolve()}"
WAIT = 60.0


async def os_pid() -> int:
    return os.getpid()


async def work(master: hp.Pid, item: int) -> None:
    await hp.expect(str)  # "go"
    await hp.send(master, ("done", item, hp.self_node()))


def _lost_node(sig: hp.ExitSignal) -> hp.NodeId:
    return sig.from_ if isinstance(sig.from_, hp.NodeId) else sig.from_.node  # type: ignore[union-attr]


async def app_fault_tolerant(cluster: hp.Cluster) -> int:
    """One work item per worker; survives the loss of a worker node, re-dispatching."""
    hp.trap_exits(True)
    me = hp.self_pid()
    pids = {nid: await hp.call(nid, os_pid) for nid in cluster.peers}
    say_line("worker pids: " + " ".join(f"{cluster.nodes.index(n)}={p}" for n, p in pids.items()))
    running = {}
    for item, nid in enumerate(cluster.peers):
        running[item] = (nid, await hp.spawn_link(nid, work, me, item))
    say_line("dispatched")
    alive = list(cluster.peers)
    while True:
        # The master's own work: plain asyncio awaits, no hpcproc call in them.
        await asyncio.sleep(0.05)
        sig = await hp.expect(hp.ExitSignal, timeout=0)
        if sig is not None and _lost_node(sig) in alive:
            break
    lost = _lost_node(sig)
    alive.remove(lost)
    say_line(f"lost {cluster.describe_node(lost)}")
    for item, (nid, _) in list(running.items()):
        if nid == lost:
            new = alive[item % len(alive)]
            running[item] = (new, await hp.spawn_link(new, work, me, item))
            say_line(f"re-dispatched item {item} to {cluster.describe_node(new)}")
    for _, pid in running.values():
        await hp.send(pid, "go")
    done: set[int] = set()
    while len(done) < len(running):
        msg = await hp.expect(tuple, timeout=WAIT)
        assert msg is not None, "a work item never finished"
        done.add(msg[1])
    say_line(f"all {len(done)} items done")
    return 0


async def app_returns_300(cluster: hp.Cluster) -> int:
    return 300


async def app_says(cluster: hp.Cluster) -> int:
    await hp.call(cluster.peers[0], says_hello)
    say_line(f"master pid {hp.self_pid()!r}")
    return 0


async def says_hello() -> None:
    hp.say("hello from a worker")


def test_master_trapping_exits_survives_kill_9_of_a_worker_node(
    ranks: list[Rank], env: dict[str, str]
) -> None:
    master = start(ranks, ["--np", "4", f"{THIS}:app_fault_tolerant"], env)
    line = master.wait_for_line("worker pids: ")
    pids = dict(part.split("=") for part in line.split(": ", 1)[1].split())
    master.wait_for_line("dispatched")
    os.kill(int(pids["2"]), signal.SIGKILL)
    rc, out = master.finish()
    assert rc == 0, out
    assert "lost rank 2 on 127.0.0.1" in out, out
    assert "re-dispatched item 1 to rank" in out, out
    assert "all 3 items done" in out, out


def test_main_returning_an_out_of_range_status_is_an_error(
    ranks: list[Rank], env: dict[str, str]
) -> None:
    r = start(ranks, ["--np", "2", f"{THIS}:app_returns_300"], env)
    rc, out = r.finish()
    assert rc == 1, out
    assert "main returned 300" in out and "0-255" in out, out


def test_say_lines_and_pids_are_short_and_name_the_rank(
    ranks: list[Rank], env: dict[str, str]
) -> None:
    r = start(ranks, ["--np", "2", f"{THIS}:app_says"], env)
    rc, out = r.finish()
    assert rc == 0, out
    assert "master pid <rank0." in out, out
    line = next(x for x in out.splitlines() if "hello from a worker" in x)
    prefix = line.split("hello from a worker")[0]
    assert "<rank1." in prefix and "nid://" not in prefix, line
    assert len(prefix) < 60, line


def test_readme_fault_tolerant_example_runs(ranks: list[Rank], env: dict[str, str]) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "fault_tolerant.py"
    r = start(ranks, ["--np", "4", f"{example}:main"], env)
    rc, out = r.finish()
    assert rc == 0, out
    assert f"sum of squares: {sum(x * x for x in range(100))} (3 workers left)" in out, out
