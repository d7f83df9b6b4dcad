"""End to end on a real Slurm cluster (tests/slurm/up.sh: slurmctld, one slurmd per host,
host1..host3 each in its own network namespace, and hidden4).

Skipped with the reason when no cluster answers, except under HPCPROC_REQUIRE_SLURM=1
(set by .ci/run), where a missing cluster is a failure.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import hpcproc as hp
from hpcproc.mpi_init import padded_ucx_addresses
from tests._lines import LineProcess

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parent.parent
THIS = str(Path(__file__).resolve())
PYTHON = sys.executable
WAIT = 90.0  # below pytest's timeout, so that a hung step fails with its output


def say_line(text: str) -> None:
    """One write per line: ranks sharing a pipe never interleave mid-line."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------ apps run under srun


async def app_ready_then_wait(cluster: Any) -> None:
    say_line(f"ready rank={cluster.rank} pid={os.getpid()}")
    await hp.expect(str)


async def report_pid(master: hp.Pid, rank: int) -> None:
    await hp.send(master, (rank, os.getpid()))
    await hp.expect(str)


async def app_workers_report_pids(cluster: Any) -> None:
    """Start a process on every worker that reports its OS pid, then wait forever."""
    me = hp.self_pid()
    for peer in cluster.peers:
        await hp.spawn(peer, report_pid, me, cluster.nodes.index(peer))
    for _ in cluster.peers:
        rank, pid = await hp.expect(tuple, timeout=60)
        say_line(f"worker rank={rank} pid={pid}")
    say_line("ready")
    await hp.expect(str)


#: The bridge's address in the root namespace (tests/slurm/up.sh): a socket
#: connected towards it takes the address of the host it runs on.
BRIDGE_ADDRESS = "127.1.0.254"


def where_am_i() -> tuple[str, str, int, int]:
    """(hostname, this host's address, network and IPC namespace inodes), seen from
    here."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((BRIDGE_ADDRESS, 9))  # sends nothing: only picks the route
        address = str(probe.getsockname()[0])
    finally:
        probe.close()
    netns, ipcns = (os.stat(f"/proc/self/ns/{ns}").st_ino for ns in ("net", "ipc"))
    return socket.gethostname(), address, netns, ipcns


async def report_where(master: hp.Pid, rank: int) -> None:
    await hp.send(master, (rank, *where_am_i()))


async def app_report_where(cluster: Any) -> None:
    """Rank 0 asks every worker where it runs (over the transport) and prints it."""
    me = hp.self_pid()
    for peer in cluster.peers:
        await hp.spawn(peer, report_where, me, cluster.nodes.index(peer))
    reports = [(0, *where_am_i())]
    for _ in cluster.peers:
        reports.append(await hp.expect(tuple, timeout=60))
    for rank, host, address, netns, ipcns in sorted(reports):
        say_line(f"where rank={rank} host={host} address={address} netns={netns} ipcns={ipcns}")


async def host_name_here() -> str:
    return socket.gethostname()


async def app_peer_routes(cluster: Any) -> int:
    """SPMD: every rank calls a function on every other rank (connections both ways),
    then prints, per peer, the peer's host and the transport that carries it, as
    ``hp.get_node_stats`` reports it."""
    hosts = {peer: await hp.call(peer, host_name_here) for peer in cluster.peers}
    # Every peer is connected now; the node's stats name the transport of each.
    stats = dict((await hp.get_node_stats(hp.self_node())).peer_transports)
    for peer, host in hosts.items():
        say_line(
            f"route rank={cluster.rank} peer={cluster.nodes.index(peer)}"
            f" peer_host={host} via={stats.get(peer)}"
        )
    say_line(f"ucx_address_padded rank={cluster.rank} {padded_ucx_addresses()}")
    return 0


# ------------------------------------------------------------ the cluster


def _slurm_conf() -> str:
    state = os.environ.get("HPCPROC_SLURM_STATE", "/tmp/hpcproc-slurm")
    return os.environ.get("SLURM_CONF") or f"{state}/slurm.conf"


def _cluster_problem(env: dict[str, str]) -> str | None:
    if shutil.which("srun") is None or shutil.which("sinfo") is None:
        return "slurm-wlm is not installed (srun/sinfo missing)"
    if not Path(env["SLURM_CONF"]).is_file():
        return f"no cluster config at {env['SLURM_CONF']} (start one: tests/slurm/up.sh)"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"],
            env=env,
            capture_output=True,
            text=True,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s"
    states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
    # "plnd": idle, but planned by the backfill scheduler for a pending job.
    up_states = ("idle", "mix", "alloc", "plnd")
    usable = [n for n in ("host1", "host2", "host3") if states.get(n, "").rstrip("*") in up_states]
    if out.returncode != 0 or len(usable) != 3:
        return f"the cluster's nodes host1..host3 are not all up: {out.stdout.strip()} {out.stderr.strip()}"
    return None


#: The one network device of every host of the test cluster (tests/slurm/up.sh).
TEST_CLUSTER_DEVICE = "eth0"


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    # UCX_*: importing ucxx (in an earlier test of this session) sets UCX_RNDV_* and
    # UCX_MEMTYPE_* in os.environ, which MPICH's own UCX then reads in the ranks;
    # seen to corrupt its address exchange under srun --mpi=pmi2.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "PMI_", "HPCPROC_", "UCX_"))
    }
    env.update(
        SLURM_CONF=_slurm_conf(),
        # Each host of the test cluster has one network device: naming it keeps
        # MPICH's UCX address (published through PMI) short. With every device listed,
        # and uninitialised bytes in it, a put line sometimes exceeds the 1024 bytes
        # Slurm 22.05 reads per PMI-1 request under --mpi=pmi2, and MPI_Init fails
        # ("mpi/pmi2: invalid client request"): seen here under load.
        UCX_NET_DEVICES=TEST_CLUSTER_DEVICE,
        HPCPROC_COOKIE=f"slurm-e2e-{uuid.uuid4().hex}",
        HPCPROC_LOG_LEVEL="INFO",
        PYTHONPATH=str(ROOT),
    )
    problem = _cluster_problem(env)
    if problem is not None:
        if os.environ.get("HPCPROC_REQUIRE_SLURM") == "1":
            pytest.fail(f"HPCPROC_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)
    return env


class Step(LineProcess):
    """An srun (or other client) process whose output lines can be awaited."""

    def __init__(self, argv: list[str], env: dict[str, str], name: str) -> None:
        super().__init__(argv, env, ROOT)
        self.name = name

    def wait_for_lines(self, pattern: str, count: int, timeout: float = WAIT) -> list[str]:
        return super().wait_for_lines(pattern, count, timeout)

    def finish(self, timeout: float = WAIT) -> tuple[int, str]:
        return super().finish(timeout)


@pytest.fixture
def steps(slurm_env: dict[str, str]) -> Iterator[list[Step]]:
    started: list[Step] = []
    yield started
    for step in started:
        step.kill(30)
    # What a failed test left in the queue is cancelled (only this test's jobs: the
    # cluster may be shared with other tests), so that the next test has nodes.
    for step in started:
        subprocess.run(["scancel", f"--name={step.name}"], env=slurm_env, timeout=30, check=False)


def srun(steps: list[Step], env: dict[str, str], *args: str, name: str | None = None) -> Step:
    name = name or f"hpcproc-e2e-{uuid.uuid4().hex[:8]}"
    step = Step(["srun", f"--job-name={name}", *args], env, name)
    steps.append(step)
    return step


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ------------------------------------------------------------ tests


def test_srun_dry_run_prints_each_ranks_placement(
    steps: list[Step], slurm_env: dict[str, str]
) -> None:
    rc, out = srun(
        steps, slurm_env, "-N", "3", "-n", "6", PYTHON, "-m", "hpcproc.run", "--dry-run", "x:y"
    ).finish()
    assert rc == 0, out
    lines = sorted(line for line in out.splitlines() if line.startswith("rank="))
    assert len(lines) == 6, out
    for rank in range(6):
        node = rank // 2
        assert any(
            line.startswith(
                f"rank={rank} size=6 node_index={node} num_nodes=3 host=host{node + 1} "
            )
            for line in lines
        ), out


def test_srun_pingpong_runs_with_all_six_ranks_across_three_hosts(
    steps: list[Step], slurm_env: dict[str, str]
) -> None:
    rc, out = srun(
        steps,
        slurm_env,
        "-N", "3", "-n", "6",
        PYTHON, "-m", "hpcproc.run", "examples/pingpong.py:main",
    ).finish()  # fmt: skip
    assert rc == 0, out
    for rank in range(6):
        host = f"host{rank // 2 + 1}"
        # auto is shm+tcp across hosts: the workers' tcp sub-addresses name their own
        # hosts (they were dialled there).
        assert re.search(
            rf"rank {rank}/6 on {host} \(slurm\) joined as NodeId\(b'route:[^']*:tcp://{host}:",
            out,
        ), out
        assert f"rank {rank} on {host} exits with status 0" in out, out
    assert out.count("round trips") == 5, out


def test_srun_scatter_gather_uses_every_worker(
    steps: list[Step], slurm_env: dict[str, str]
) -> None:
    rc, out = srun(
        steps,
        slurm_env,
        "-N", "3", "-n", "6",
        PYTHON, "-m", "hpcproc.run", "examples/scatter_gather.py:main",
    ).finish()  # fmt: skip
    assert rc == 0, out
    for rank in range(1, 6):
        assert f"scatter_gather: rank {rank} on host{rank // 2 + 1} " in out, out
    assert "5 workers" in out and ": OK" in out, out


def test_heterogeneous_step_runs_across_components(
    steps: list[Step], slurm_env: dict[str, str]
) -> None:
    rc, out = srun(
        steps,
        slurm_env,
        "-N1", "-n1", ":", "-N2", "-n2",
        PYTHON, "-m", "hpcproc.run", "examples/scatter_gather.py:main",
    ).finish()  # fmt: skip
    assert rc == 0, out
    assert (
        "scatter_gather: rank 1 on host2 " in out and "scatter_gather: rank 2 on host3 " in out
    ), out
    assert "2 workers" in out and ": OK" in out, out


def test_sbatch_wait_jobscript_succeeds_and_shows_result(
    slurm_env: dict[str, str], tmp_path: Path
) -> None:
    out_file = tmp_path / "job.out"
    env = {**slurm_env, "PYTHON": PYTHON}
    name = f"hpcproc-sbatch-{uuid.uuid4().hex[:8]}"
    try:
        done = subprocess.run(
            [
                "sbatch",
                "--wait",
                f"--job-name={name}",
                f"--output={out_file}",
                "jobscripts/slurm.sbatch",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
    finally:
        subprocess.run(["scancel", f"--name={name}"], env=slurm_env, timeout=30, check=False)
    output = out_file.read_text() if out_file.exists() else "<no output file>"
    assert done.returncode == 0, (done.stdout, done.stderr, output)
    assert "5 workers" in output and ": OK" in output, output
    assert "finished with status 0" in output, output


def test_srun_pmi2_with_mpi_transport(steps: list[Step], slurm_env: dict[str, str]) -> None:
    if importlib.util.find_spec("hpcproc.transports.mpi") is None:
        pytest.skip("hpcproc.transports.mpi does not exist yet")
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install hpcproc[mpi])")
    rc, out = srun(
        steps,
        slurm_env,
        "--mpi=pmi2", "-N", "2", "-n", "4",
        PYTHON, "-m", "hpcproc.run", "--transport", "mpi", "examples/scatter_gather.py:main",
    ).finish()  # fmt: skip
    assert rc == 0, out
    assert "3 workers" in out and ": OK" in out, out
    for rank in range(4):
        assert re.search(
            rf"rank {rank}/4 on host{rank // 2 + 1} \(slurm\+pmi\) joined as NodeId\(b'mpi:", out
        ), out


def test_mpi_starts_under_pmi2_with_a_heap_full_of_junk(
    steps: list[Step], slurm_env: dict[str, str]
) -> None:
    """MPICH publishes 4096 bytes read from its UCX address buffer; with the pad
    (hpcproc.mpi_init.pad_ucx_address) they are the address and zeros, whatever was on
    the heap. Without it this MPI_Init fails (junk cuts Slurm's PMI-1 put lines)."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install hpcproc[mpi])")
    rc, out = srun(
        steps,
        slurm_env,
        "--mpi=pmi2", "-N", "2", "-n", "4",
        PYTHON, str(ROOT / "tests" / "mpi" / "init_on_a_dirty_heap.py"),
    ).finish(timeout=60)  # fmt: skip
    assert rc == 0, out
    ranks = re.findall(r"^initialised rank=(\d+) padded=(\S+) ", out, re.M)
    assert sorted(int(rank) for rank, _ in ranks) == [0, 1, 2, 3], out
    assert all(padded == "1" for _, padded in ranks), out


def test_scancel_ends_every_rank_within_10_s(steps: list[Step], slurm_env: dict[str, str]) -> None:
    name = f"hpcproc-scancel-{uuid.uuid4().hex[:8]}"
    step = srun(
        steps,
        slurm_env,
        "-N", "3", "-n", "6",
        PYTHON, "-m", "hpcproc.run", "--spmd", f"{THIS}:app_ready_then_wait",
        name=name,
    )  # fmt: skip
    ready = step.wait_for_lines(r"^ready rank=\d+ pid=\d+", 6)
    pids = [int(line.split("pid=")[1]) for line in ready]
    subprocess.run(["scancel", f"--name={name}"], env=slurm_env, timeout=30, check=True)
    cancelled_at = time.monotonic()
    deadline = cancelled_at + 10.0
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling for exit, bounded by the deadline
    left = [p for p in pids if _alive(p)]
    assert not left, f"ranks still running 10 s after scancel: {left}"
    rc, out = step.finish(timeout=30)
    assert rc != 0
    assert out.count("stopped by SIGTERM") == 6, out


def test_killed_rank_makes_master_exit_nonzero_naming_it(
    steps: list[Step], slurm_env: dict[str, str]
) -> None:
    step = srun(
        steps,
        slurm_env,
        "-N", "3", "-n", "6", "--kill-on-bad-exit=0",
        PYTHON, "-m", "hpcproc.run", f"{THIS}:app_workers_report_pids",
    )  # fmt: skip
    lines = step.wait_for_lines(r"^worker rank=\d+ pid=\d+", 5)
    step.wait_for_lines(r"^ready", 1)
    pids = {
        int(m[1]): int(m[2])
        for m in (re.match(r"worker rank=(\d+) pid=(\d+)", x) for x in lines)
        if m
    }
    os.kill(pids[4], signal.SIGKILL)
    rc, out = step.finish()
    assert rc != 0, out
    assert re.search(r"main failed on rank 0 \(host1\): .*node rank 4 on host3", out), out
    assert all(not _alive(p) for p in pids.values()), out


# ------------------------------------------------------------ several hosts


# Not the id "mpi": pytest-mpi skips tests with that keyword outside mpiexec.
@pytest.mark.parametrize(
    "transport",
    ["tcp", pytest.param("mpi", id="mpi-pmi2"), pytest.param("ucx", marks=pytest.mark.ucx)],
)
def test_ranks_of_a_three_node_step_run_on_three_distinct_hosts(
    steps: list[Step], slurm_env: dict[str, str], transport: str
) -> None:
    """Each node of the cluster is another host, as the ranks see it: its own
    hostname, address and network stack, and its own IPC namespace (so that UCX, and
    MPI over it, cannot share memory across hosts either); and every transport that
    crosses hosts connects them."""
    options = []
    if transport == "mpi":
        pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install hpcproc[mpi])")
        options = ["--mpi=pmi2"]
    if transport == "ucx":
        pytest.importorskip("ucxx", reason="ucxx is not installed (pip install hpcproc[ucx])")
    rc, out = srun(
        steps,
        slurm_env,
        *options, "-N", "3", "-n", "6",
        PYTHON, "-m", "hpcproc.run", "--transport", transport, f"{THIS}:app_report_where",
    ).finish()  # fmt: skip
    assert rc == 0, out
    where = r"^where rank=(\d+) host=(\S+) address=(\S+) netns=(\d+) ipcns=(\d+)$"
    seen = {int(m[1]): (m[2], m[3], m[4], m[5]) for m in re.finditer(where, out, re.M)}
    assert sorted(seen) == list(range(6)), out
    for rank, (host, address, _, _) in seen.items():
        node = rank // 2 + 1
        assert (host, address) == (f"host{node}", f"127.1.0.{node}"), out
    assert len({netns for _, _, netns, _ in seen.values()}) == 3, out
    assert len({ipcns for _, _, _, ipcns in seen.values()}) == 3, out


def test_shm_across_hosts_is_refused_at_start_up_naming_hosts_and_transports(
    steps: list[Step], slurm_env: dict[str, str]
) -> None:
    rc, out = srun(
        steps,
        slurm_env,
        "-N", "2", "-n", "4",
        PYTHON, "-m", "hpcproc.run", "--transport", "shm", "examples/pingpong.py:main",
    ).finish()  # fmt: skip
    assert rc != 0, out
    refusals = re.findall(
        r"--transport shm connects ranks on one host only, but this job's ranks run on 2"
        r" hosts: host1 \(ranks 0-1\), host2 \(ranks 2-3\)\. Use --transport tcp\b",
        out,
    )
    assert len(refusals) == 4, out  # every rank refuses, before connecting to any
    assert "round trips" not in out and "lost connection" not in out, out


def _two_hosts_two_ranks(transport: str) -> list[str]:
    """srun options and the hpcproc.run transport options for 2 hosts x 2 ranks."""
    if transport == "shm+mpi":
        pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install hpcproc[mpi])")
        return ["--mpi=pmi2", "-N", "2", "-n", "4"]
    return ["-N", "2", "-n", "4"]


_ROUTED = ["auto", "shm+tcp", pytest.param("shm+mpi", id="shm+mpi-pmi2")]


@pytest.mark.parametrize("transport", _ROUTED)
def test_same_host_peers_use_shm_and_other_hosts_the_network(
    steps: list[Step], slurm_env: dict[str, str], transport: str
) -> None:
    """2 hosts x 2 ranks: each rank reaches the other rank of its host over shm and
    the two ranks of the other host over the network transport, at once."""
    network = "tcp" if transport == "auto" else transport.partition("+")[2]
    rc, out = srun(
        steps,
        slurm_env,
        *_two_hosts_two_ranks(transport),
        PYTHON, "-m", "hpcproc.run", "--spmd", "--transport", transport,
        f"{THIS}:app_peer_routes",
    ).finish()  # fmt: skip
    assert rc == 0, out
    routes = {
        (int(m[1]), int(m[2])): (m[3], m[4])
        for m in re.finditer(r"^route rank=(\d+) peer=(\d+) peer_host=(\S+) via=(\S+)$", out, re.M)
    }
    assert sorted(routes) == [(r, p) for r in range(4) for p in range(4) if r != p], out
    for (rank, peer), (host, via) in routes.items():
        assert host == f"host{peer // 2 + 1}", out
        assert via == ("shm" if rank // 2 == peer // 2 else network), (rank, peer, out)
    # Where MPI runs, hpcproc.run initialised it with the UCX address padded
    # (hpcproc.mpi_init.pad_ucx_address): MPICH asked for one address per rank.
    padded = re.findall(r"^ucx_address_padded rank=\d+ (.*)$", out, re.M)
    assert padded == ["1" if network == "mpi" else "None"] * 4, out


@pytest.mark.parametrize("transport", ["shm+tcp", pytest.param("shm+mpi", id="shm+mpi-pmi2")])
def test_routed_pingpong_across_two_hosts_exits_zero(
    steps: list[Step], slurm_env: dict[str, str], transport: str
) -> None:
    rc, out = srun(
        steps,
        slurm_env,
        *_two_hosts_two_ranks(transport),
        PYTHON, "-m", "hpcproc.run", "--transport", transport, "examples/pingpong.py:main",
    ).finish()  # fmt: skip
    assert rc == 0, out
    for rank in range(1, 4):
        assert f"pingpong with rank {rank} on host{rank // 2 + 1}" in out, out


def test_srun_dry_run_prints_each_ranks_per_peer_plan(
    steps: list[Step], slurm_env: dict[str, str]
) -> None:
    rc, out = srun(
        steps, slurm_env, "-N", "2", "-n", "4", PYTHON, "-m", "hpcproc.run", "--dry-run", "x:y"
    ).finish()
    assert rc == 0, out
    plans = sorted(line for line in out.splitlines() if line.startswith("plan "))
    assert plans == [
        "plan rank=0 transport=shm+tcp: shm to ranks 1, tcp to ranks 2-3",
        "plan rank=1 transport=shm+tcp: shm to ranks 0, tcp to ranks 2-3",
        "plan rank=2 transport=shm+tcp: shm to ranks 3, tcp to ranks 0-1",
        "plan rank=3 transport=shm+tcp: shm to ranks 2, tcp to ranks 0-1",
    ], out


def _require_hidden_node(env: dict[str, str]) -> None:
    """The cluster's node whose name resolves nowhere (tests/slurm/up.sh)."""
    out = subprocess.run(
        ["sinfo", "-h", "-N", "-p", "hidden", "-o", "%N %t"],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
    problem = None
    if states.get("hidden4", "").rstrip("*") not in ("idle", "mix", "alloc", "plnd"):
        problem = f"node hidden4 of partition hidden is not up: {out.stdout} {out.stderr}"
    else:
        try:
            socket.getaddrinfo("hidden4", None)
            problem = "the node name hidden4 resolves here; the test needs one that does not"
        except OSError:
            pass
    if problem is not None:
        if os.environ.get("HPCPROC_REQUIRE_SLURM") == "1":
            pytest.fail(f"HPCPROC_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)


def test_rank_zero_on_a_node_whose_name_does_not_resolve_is_reached_at_its_node_addr(
    steps: list[Step], slurm_env: dict[str, str]
) -> None:
    """NodeName hidden4 resolves nowhere; Slurm's NodeAddr for it does."""
    _require_hidden_node(slurm_env)
    rc, out = srun(
        steps,
        slurm_env,
        "-p", "hidden", "-N", "2", "-n", "2",
        PYTHON, "-m", "hpcproc.run", "examples/pingpong.py:main",
    ).finish()  # fmt: skip
    assert rc == 0, out
    assert re.search(
        r"rank 0/2 on hidden4 \(slurm\) joined as NodeId\(b'route:[^']*:tcp://127\.1\.0\.4:", out
    ), out
    assert "pingpong with rank 1 on host3" in out, out


def test_unresolvable_node_without_an_address_fails_at_once_naming_it_and_the_fix(
    steps: list[Step], slurm_env: dict[str, str], tmp_path: Path
) -> None:
    """When Slurm cannot give an address either (here: scontrol fails), every rank
    fails at once instead of retrying for the whole rendezvous timeout."""
    _require_hidden_node(slurm_env)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\necho 'scontrol: error: no controller' >&2\nexit 1\n")
    (fake / "scontrol").chmod(0o755)
    env = {**slurm_env, "PATH": f"{fake}:{slurm_env.get('PATH', '/usr/bin:/bin')}"}
    rc, out = srun(
        steps,
        env,
        "-p", "hidden", "-N", "2", "-n", "2",
        PYTHON, "-m", "hpcproc.run", "--timeout", "600", "examples/pingpong.py:main",
    ).finish()  # fmt: skip
    assert rc != 0, out
    assert "node name 'hidden4' does not resolve" in out, out
    assert "scontrol: error: no controller" in out, out
    # Rank 1 dials rank 0's store there: the fix names HPCPROC_RENDEZVOUS_HOST.
    assert re.search(r"rank 1 on host3: rendezvous: rank 0's host: .*HPCPROC_RENDEZVOUS_HOST", out)
    assert "timed out" not in out and "not reachable within" not in out, out
