"""``python -m hpcproc.run --discover`` (issue 16, part 2): nodes that find each other by
UDP multicast, announcements signed with the cookie. Real OS processes: on this
machine's loopback (group on 224.0.0.x, interface 127.0.0.1), and one node per host of
the multi-host cluster (network namespaces hpcproc-h1..h3, multicast across their
bridge)."""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import hpcproc as hp
from hpcproc.rendezvous.multicast import MAX_AGE, Announcement, Announcer, sign, verify
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


async def app_hosts(cluster: Any) -> int:
    hosts = sorted([await hp.call(p, where) for p in cluster.peers])
    say_line(f"master on {socket.gethostname()} peers={len(cluster.peers)} hosts={hosts}")
    return 0


async def app_wait_late(cluster: Any) -> int:
    hp.monitor_nodes()
    say_line(f"running with peers={len(cluster.peers)}")
    up = await hp.expect(hp.NodeUp, timeout=WAIT)
    assert up is not None, "the late node did not join"
    say_line(f"late node joined on {await hp.call(up.node, where)}; members={len(hp.nodes())}")
    return 4


# ------------------------------------------------------------ helpers


@pytest.fixture
def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HPCPROC_", "SLURM_"))}
    e["PYTHONPATH"] = str(ROOT)
    e["HPCPROC_COOKIE"] = f"test-discover-{uuid.uuid4().hex}"
    return e


@pytest.fixture
def group() -> str:
    """A group of the link-local block on a port of its own (tests may run at once)."""
    return f"224.0.0.99:{random.randrange(20000, 30000)}"


@pytest.fixture
def procs() -> Iterator[list[LineProcess]]:
    started: list[LineProcess] = []
    yield started
    for p in started:
        p.kill(30)


def node(
    procs: list[LineProcess],
    env: dict[str, str],
    group: str,
    app: str,
    *options: str,
    prefix: tuple[str, ...] = (),
) -> LineProcess:
    argv = [*prefix, sys.executable, "-m", "hpcproc.run", "--discover", "--group", group]
    p = LineProcess([*argv, *options, f"{THIS}:{app}"], env, ROOT)
    procs.append(p)
    return p


LOOPBACK = ("--interface", "127.0.0.1")


# ------------------------------------------------------------ announcements


def test_announcement_signed_with_another_cookie_is_refused() -> None:
    ann = Announcement(b"tcp://127.0.0.1:1/a/1", "h", "node", time.time(), "n1")
    datagram = sign(b"stranger", ann)
    with pytest.raises(ValueError, match="not signed with this cluster's cookie"):
        verify(b"ours", datagram, time.time())
    assert verify(b"stranger", datagram, time.time()) == ann


def test_tampered_or_stale_announcement_is_refused() -> None:
    ann = Announcement(b"tcp://127.0.0.1:1/a/1", "h", "node", time.time(), "n1")
    datagram = sign(b"ours", ann)
    tampered = datagram.replace(b"127.0.0.1", b"127.0.0.2")
    with pytest.raises(ValueError, match="not signed"):
        verify(b"ours", tampered, time.time())
    with pytest.raises(ValueError, match="stale"):
        verify(b"ours", datagram, ann.timestamp + MAX_AGE + 1)


def test_replayed_announcement_is_counted_once_and_own_is_ignored() -> None:
    me = b"tcp://127.0.0.1:1/a/1"
    announcer = Announcer(b"ours", me, "h")
    other = Announcement(b"tcp://127.0.0.1:2/b/1", "h2", "node", time.time(), "n1")
    announcer.received(sign(b"ours", other), "127.0.0.1")
    assert list(announcer.seen) == [other.address] and announcer.changed.is_set()
    announcer.changed.clear()
    # The same datagram again (a replay), now claiming nothing new: not a change.
    announcer.received(sign(b"ours", other), "127.0.0.1")
    assert not announcer.changed.is_set()
    announcer.received(sign(b"ours", Announcement(me, "h", "node", time.time(), "n2")), "x")
    announcer.received(
        sign(b"stranger", Announcement(b"tcp://x:3/c/1", "s", "master", time.time(), "n3")), "x"
    )
    assert list(announcer.seen) == [other.address]


# ------------------------------------------------------------ on this machine


def test_three_nodes_find_each_other_and_one_leads(
    procs: list[LineProcess], env: dict[str, str], group: str
) -> None:
    nodes = [node(procs, env, group, "app_hosts", *LOOPBACK, "--min-nodes", "3") for _ in range(3)]
    outs = [p.finish(WAIT) for p in nodes]
    assert [rc for rc, _ in outs] == [0, 0, 0], outs
    leaders = [out for _, out in outs if "master on " in out]
    assert len(leaders) == 1, outs
    assert "peers=2" in leaders[0], outs


def test_node_with_another_cookie_is_ignored(
    procs: list[LineProcess], env: dict[str, str], group: str
) -> None:
    wait = ("--min-nodes", "3", "--timeout", "3")
    honest = [node(procs, env, group, "app_hosts", *LOOPBACK, *wait) for _ in range(2)]
    stranger = node(
        procs, {**env, "HPCPROC_COOKIE": "a-stranger"}, group, "app_hosts", *LOOPBACK, *wait
    )
    outs = [p.finish(WAIT) for p in honest]
    assert [rc for rc, _ in outs] == [0, 0], outs
    both = "".join(out for _, out in outs)
    # Three nodes on the group, only two with the cookie: the master runs with one peer.
    assert re.search(r"master on \S+ peers=1 ", both), both
    assert (
        "ignoring discovery datagrams from 127.0.0.1: not signed with this cluster's cookie" in both
    )
    rc, out = stranger.finish(WAIT)
    assert rc == 0 and "peers=0" in out, out


def test_node_started_after_main_began_joins_it(
    procs: list[LineProcess], env: dict[str, str], group: str
) -> None:
    # Alone on the group with --min-nodes 1, it leads and main starts at once.
    running = node(procs, env, group, "app_wait_late", *LOOPBACK)
    running.wait_for_lines(r"^running with peers=0", 1, WAIT)
    late = node(procs, env, group, "app_wait_late", *LOOPBACK)
    line = running.wait_for_lines(r"^late node joined", 1, WAIT)[0]
    assert line.strip().endswith("members=1"), line
    assert running.finish(WAIT)[0] == 4
    # The node that joined ends with the master's status.
    rc, out = late.finish(WAIT)
    assert rc == 4, out


# ------------------------------------------------------------ across hosts


def _hosts_problem() -> str | None:
    if os.geteuid() != 0 or shutil.which("nsenter") is None or shutil.which("unshare") is None:
        return "needs root, nsenter and unshare to enter the cluster's host namespaces"
    missing = [h for h in (1, 2, 3) if not Path(f"/run/netns/hpcproc-h{h}").exists()]
    if missing:
        return f"the multi-host cluster is down (no /run/netns/hpcproc-h{missing[0]}; tests/slurm/up.sh)"
    return None


@pytest.mark.slurm
def test_one_node_per_host_discover_each_other_across_the_bridge(
    procs: list[LineProcess], env: dict[str, str], group: str
) -> None:
    problem = _hosts_problem()
    if problem is not None:
        if os.environ.get("HPCPROC_REQUIRE_SLURM") == "1":
            pytest.fail(f"HPCPROC_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)
    nodes = []
    for h in (1, 2, 3):
        # The host's network stack, its own host name and IPC namespace (as its
        # slurmd); no --interface: the route for the group (224.0.0.0/4 out of the
        # host's eth0) picks it.
        prefix = (
            "nsenter", f"--net=/run/netns/hpcproc-h{h}", "unshare", "-u", "-i", "sh", "-c",
            f'hostname host{h}; exec "$@"', "sh",
        )  # fmt: skip
        nodes.append(node(procs, env, group, "app_hosts", "--min-nodes", "3", prefix=prefix))
    outs = [p.finish(WAIT) for p in nodes]
    assert [rc for rc, _ in outs] == [0, 0, 0], outs
    # Lowest address (127.1.0.1, host1) leads; the others are reached over the bridge.
    assert "master on host1 peers=2 hosts=['host2', 'host3']" in outs[0][1], outs
